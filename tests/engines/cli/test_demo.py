"""``arcface demo`` tells its own story: the lines Ray forwards from its processes go to a file."""

from __future__ import annotations

import io

from engines.cli.demo import _ForwardedLinesToFile


def test_rays_forwarded_lines_go_to_the_log_and_the_demos_own_to_the_terminal():
    terminal, log = io.StringIO(), io.StringIO()
    stream = _ForwardedLinesToFile(terminal, log)
    stream.write("== 5. online service ==\nstarted in 4")  # a line written in two parts
    stream.write("3.9 s\n\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed.\n")
    stream.write("(EmbedActor pid=123) ready\n\x1b[36m(MapWorker(MapBatches(EmbedActor)) pid=9)\x1b[0m hi\n")
    stream.write("(a parenthesis of our own) stays\n")
    ours = "== 5. online service ==\nstarted in 43.9 s\n(a parenthesis of our own) stays\n"
    assert terminal.getvalue() == ours
    assert log.getvalue().count("\n") == 3 and "graceful_shutdown" in log.getvalue()
