"""The demo's temporary image files, deleted once they are `age_s` old.

Gradio's own `delete_cache` walks each of its live sets of file names in a worker thread while request threads
add to them: under load the walk meets a set that grew ("Set changed size during iteration"), and that error
ends its deletion task for good, so files pile up on disk until the process stops (seen in `make test` with two
workers). This sweeper walks a copy of each set, taken in one step (copying a set of strings holds the GIL
throughout), in a thread of its own, and an error in one sweep only skips that sweep."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

log = logging.getLogger("flowmap.ui")

DEFAULT_CACHE_SECONDS = 300  # how long a page's image stays on disk (`--ui-cache-seconds`)


def sweep(blocks, age_s: float | None) -> int:
    """Delete the files `blocks` wrote for its pages (Gradio's temporary file sets) that are more than `age_s`
    seconds old (by ctime, which Gradio touches when it hands a cached file out again), or all of them where `age_s`
    is None; return how many went."""
    now = time.time()
    keep = set()
    for component in list(blocks.blocks.values()):
        keep.update(getattr(component, "keep_in_cache", ()))
    deleted = 0
    for names in list(blocks.temp_file_sets):
        gone = set()
        for name in list(names):  # a copy: request threads add to the set meanwhile
            if name in keep:
                continue
            try:
                if age_s is None or now - os.lstat(name).st_ctime > age_s:
                    os.remove(name)
                    gone.add(name)
            except FileNotFoundError:
                gone.add(name)
        names.difference_update(gone)  # one step, as the copy was
        deleted += len(gone)
    return deleted


@contextlib.contextmanager
def deleting_temp_files(blocks, age_s: float):
    """Files older than `age_s` swept every quarter of it (so none outlives 1.25 `age_s`), in a daemon thread, while
    inside; on the way out, all of them (a restarted demo would not know them)."""
    stopped = threading.Event()

    def sweep_until_stopped() -> None:
        while not stopped.wait(age_s / 4):
            try:
                sweep(blocks, age_s)
            except Exception:  # one failed sweep must not end the ones after it
                log.exception("deleting the demo's temporary files failed; trying again in %g s", age_s / 4)

    sweeper = threading.Thread(target=sweep_until_stopped, name="ui-temp-files", daemon=True)
    sweeper.start()
    try:
        yield
    finally:
        stopped.set()
        sweeper.join()
        sweep(blocks, None)
