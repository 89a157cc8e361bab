"""Fault injection for tests/test_launch.py, on the PYTHONPATH of launched parts: the part named by
PKD_TEST_KILL_PART (e.g. "2/4") kills itself with SIGKILL once its first shard is committed, the
first time only (a marker `<its --out>.killed` remembers), so its retry runs to the end."""

import os
import sys
import threading
import time


def _watch(part: str) -> None:
    time.sleep(0.5)  # sys.argv is set once the interpreter has started the program
    argv = sys.argv
    if "--part" not in argv or argv[argv.index("--part") + 1] != part:
        return
    out = argv[argv.index("--out") + 1]
    marker = out + ".killed"
    if os.path.exists(marker):
        return
    import pkd.engines.hf as hf  # slowed, so that the kill lands between two shards

    score = hf.HFEngine.score_topk

    def slow(self, *args, **kwargs):
        time.sleep(0.3)
        yield from score(self, *args, **kwargs)

    hf.HFEngine.score_topk = slow
    while True:
        try:
            with open(os.path.join(out, "manifest.json")) as f:
                if '"path"' in f.read():  # a shard is committed: the part is mid-way
                    break
        except OSError:
            pass
        time.sleep(0.05)
    open(marker, "w").close()
    os.kill(os.getpid(), 9)


if os.environ.get("PKD_TEST_KILL_PART"):
    threading.Thread(target=_watch, args=(os.environ["PKD_TEST_KILL_PART"],), daemon=True).start()
