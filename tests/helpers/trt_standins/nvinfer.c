/* Stand-in libnvinfer.so.N: the entry points the TensorRT Python bindings resolve at load.
 * Names only (see README.md): every factory returns NULL, the version is 0. */
#include <stddef.h>

void *createInferBuilder_INTERNAL(void *logger, int version) { (void)logger; (void)version; return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) {
    (void)engine; (void)logger; (void)version; return NULL;
}
void *createInferRuntime_INTERNAL(void *logger, int version) { (void)logger; (void)version; return NULL; }
void *getBuilderPluginRegistry(int capability) { (void)capability; return NULL; }
void *getPluginRegistry(void) { return NULL; }
int getInferLibVersion(void) { return 0; }
