"""The runtime builds each part once per process, anew in a forked child, and lets a
test put its own in place for a while."""

from __future__ import annotations

import os
import signal
import threading

from payq.runtime import Part, Runtime
from payq.settings import load_settings


class Thing:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.closed = False
        self.inherited = False


def parts() -> tuple[Part[Thing], Part[Thing], list[Thing]]:
    made: list[Thing] = []

    def build(rt: Runtime) -> Thing:
        made.append(Thing())
        return made[-1]

    def inherit(thing: Thing) -> None:
        thing.inherited = True

    def close(thing: Thing) -> None:
        thing.closed = True

    renewed = Part("renewed", build=build, after_fork=inherit, close=close)
    kept = Part("kept", build=build, close=close)
    return renewed, kept, made


def test_a_part_is_built_once_for_all_threads() -> None:
    rt, (part, _, made) = Runtime(load_settings()), parts()
    got: list[Thing] = []
    threads = [threading.Thread(target=lambda: got.append(rt.get(part))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and all(g is made[0] for g in got)


def test_a_forked_child_builds_anew_what_asks_for_it_and_keeps_the_rest() -> None:
    rt, (renewed, kept, _) = Runtime(load_settings()), parts()
    parents = rt.get(renewed), rt.get(kept)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports and leaves at once
        fresh, same = rt.get(renewed), rt.get(kept)
        ok = fresh is not parents[0] and parents[0].inherited and same is parents[1]
        os.write(write, b"1" if ok and fresh.pid == os.getpid() else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert rt.get(renewed) is parents[0] and not parents[0].inherited  # the parent's own


def test_a_test_replaces_a_part_for_a_block_and_close_closes_them() -> None:
    rt, (part, other, _) = Runtime(load_settings()), parts()
    mine = Thing()
    with rt.replaced(part, mine):
        assert rt.get(part) is mine
    assert rt.built(part) is None  # nothing was there before: nothing is now
    built = rt.get(part), rt.get(other)
    rt.close()
    assert all(thing.closed for thing in built) and rt.built(part) is None


def test_a_child_forked_while_a_part_is_being_built_does_not_hang() -> None:
    rt = Runtime(load_settings())
    building, release = threading.Event(), threading.Event()

    def slow(rt: Runtime) -> Thing:
        building.set()
        release.wait(5)
        return Thing()

    part, (other, _, _) = Part("slow", build=slow), parts()
    builder = threading.Thread(target=lambda: rt.get(part))
    builder.start()
    building.wait(5)  # the builder holds the runtime's lock now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        signal.alarm(5)  # a hang ends the child, and the test sees no byte
        rt.get(other)
        os.write(write, b"1")
        os._exit(0)
    release.set()
    builder.join()
    os.waitpid(pid, 0)
    os.close(write)
    assert os.read(read, 1) == b"1"
