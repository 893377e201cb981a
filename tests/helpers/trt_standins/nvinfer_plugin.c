/* Stand-in libnvinfer_plugin.so.N (names only, see README.md): registers no plugin. */
#include <stdbool.h>

bool initLibNvInferPlugins(void *logger, const char *libNamespace) { (void)logger; (void)libNamespace; return false; }
