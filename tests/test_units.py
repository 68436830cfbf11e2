"""The manager's parts on their own: configuration, registry files, validation, paths."""
from __future__ import annotations

import dataclasses
import json
import os
import stat

import numpy as np
import pytest

from infinibrain.errors import InfinibrainException
from infinibrain.manager.config import ConfigError, embedded_default, load_config, parse_config
from infinibrain.manager.registry import InstanceRecord, Placement, Registration, Registry, Stable
from infinibrain.manager.runtimes.process import safe_join
from infinibrain.manager.validate import normalize_config


def test_embedded_default_is_one_local_board_on_loopback():
    cfg = embedded_default()
    assert (cfg.host, cfg.port) == ("127.0.0.1", 5570)
    assert [b.name for b in cfg.boards] == ["local"] and cfg.boards[0].transport == "local"
    assert cfg.state_dir.endswith("infinibrain")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[manager]\nprot = 1\n[[coprocessor]]\nname='a'\n", "'prot'"),
        ("[manager]\nport = 'x'\n[[coprocessor]]\nname='a'\n", "manager.port"),
        ("[manager]\nhost = 'my-host'\n[[coprocessor]]\nname='a'\n", "manager.host"),
        ("[manager]\nsend_queue_size = 0\n[[coprocessor]]\nname='a'\n", "send_queue_size"),
        ("[manager]\n", "coprocessor"),
        ("[[coprocessor]]\nname='a'\ncolour='red'\n", "'colour'"),
        ("[[coprocessor]]\nname='a'\n[[coprocessor]]\nname='a'\n", "used twice"),
        ("[[coprocessor]]\nname='a'\ntransport='telnet'\n", "transport"),
        ("[[coprocessor]]\nname='a'\ntransport='ssh'\n", "ssh_user"),
        ("[[coprocessor]]\nname='all'\n", "name"),
        ("[manager\n", "TOML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path, text, needle):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)


def test_good_configuration(tmp_path):
    cfg = parse_config({"manager": {"port": 7000, "state_dir": str(tmp_path)}, "coprocessor": [
        {"name": "cop1", "transport": "ssh", "address": "127.0.0.2", "ssh_user": "root", "ssh_port": 2222}]})
    assert cfg.port == 7000 and cfg.boards[0].ssh_port == 2222 and cfg.boards[0].manager_address == "127.0.0.1"


def test_registry_round_trip_is_atomic_and_private(tmp_path):
    reg = Registry(tmp_path / "state")
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    config = normalize_config({"name": "cam", "implementation_type": "process", "run_command": "python x.py"})
    placement = Placement(distribution="off", instances=[InstanceRecord("cam-local.r3", 3, pid=12, pid_start=99)])
    reg.registrations["cam"] = Registration("cam", config, {"local": placement}, revision=3, next_revision=5,
                                            stable=Stable(2, config))
    reg.persist("cam").result(10)
    assert [p.name for p in (tmp_path / "state" / "inferences").iterdir()] == ["cam.json"]  # no temp files left
    back = reg.read("cam")
    assert back.config == config and back.boards["local"].distribution == "off"
    assert back.boards["local"].instances == [InstanceRecord("cam-local.r3", 3, pid=12, pid_start=99)]
    assert (back.revision, back.next_revision, back.stable.revision) == (3, 5, 2)
    assert list(reg.load_all()) == ["cam"]
    (tmp_path / "state" / "inferences" / "junk.json").write_text("{")
    assert list(reg.load_all()) == ["cam"]  # a broken file is skipped, not fatal
    codes = []
    for name in ("missing", "junk"):
        with pytest.raises(InfinibrainException) as err:
            reg.read(name)
        codes.append(err.value.code)
    assert codes == [205, 206]
    del reg.registrations["cam"]
    reg.persist("cam").result(10)
    assert not (tmp_path / "state" / "inferences" / "cam.json").exists()
    reg.close()


def test_registry_reads_format_1_as_revision_1(tmp_path):
    """A file written before instances had revisions: its container is adopted by its old name."""
    reg = Registry(tmp_path / "state")
    config = normalize_config({"name": "cam", "implementation_type": "process", "run_command": "python x.py"})
    old = {"format": 1, "name": "cam", "config": config.to_dict(),
           "boards": {"b1": {"distribution": "on", "running": True, "pid": 7, "pid_start": 70, "created": "t"}}}
    reg.store.path("cam").write_text(json.dumps(old))
    back = reg.read("cam")
    assert back.revision == 1 and back.next_revision == 2 and back.stable is None
    assert back.boards["b1"].instances == [InstanceRecord("cam-b1", 1, 7, 70, "t")]
    reg.close()


def test_validation_normalizes():
    cfg = normalize_config({"name": "a", "implementation_type": "LOOP", "input": "main", "output": "None"})
    assert (cfg.implementation_type, cfg.input, cfg.output) == ("Loop", "Main", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.input = None  # type: ignore[misc]  # settings change only as a new revision
    with pytest.raises(InfinibrainException) as err:
        normalize_config({"name": "a", "colour": 1})
    assert err.value.code == 302 and "colour" in str(err.value)
    with pytest.raises(InfinibrainException) as err:
        normalize_config({"name": "a", "inference_modules": {"script": "x.py"}})
    assert err.value.code == 201 and "sub_inference_name" in str(err.value)
    with pytest.raises(InfinibrainException) as err:
        normalize_config(json.dumps([1]))
    assert err.value.code == 200


def test_paths_stay_inside_the_container(tmp_path):
    assert safe_join(tmp_path, "/etc/cop/") == tmp_path / "etc/cop"
    assert safe_join(tmp_path, "a/../b") == tmp_path / "b"
    assert safe_join(tmp_path, "/") == tmp_path / "."
    for bad in ("..", "../x", "/a/../../x"):
        with pytest.raises(InfinibrainException):
            safe_join(tmp_path, bad)


def test_run_option_maps_docker_run_options_to_sdk_arguments(monkeypatch):
    from infinibrain.manager.run_options import parse_run_option

    monkeypatch.setenv("IB_PASS", "from-manager")
    args = parse_run_option(
        "--dns=8.8.8.8 --net=bridge -e A=1 --env B='two words' -e IB_PASS -v /data:/data:ro --volume=/x:/y "
        "--shm-size 1g --cpus=0.5 -m 512m --device /dev/video0:/dev/video0 --gpus all --runtime nvidia "
        "--ipc=host --privileged -w /work -u 1000:1000 --entrypoint 'python3 -u'"
    )
    assert args["dns"] == ["8.8.8.8"] and args["network_mode"] == "bridge"
    assert args["environment"] == ["A=1", "B=two words", "IB_PASS=from-manager"]
    assert args["volumes"] == ["/data:/data:ro", "/x:/y"]
    assert args["shm_size"] == "1g" and args["nano_cpus"] == 500_000_000 and args["mem_limit"] == "512m"
    assert args["devices"] == ["/dev/video0:/dev/video0"] and args["runtime"] == "nvidia"
    assert args["device_requests"][0]["Count"] == -1 and args["device_requests"][0]["Capabilities"] == [["gpu"]]
    assert args["ipc_mode"] == "host" and args["privileged"] is True
    assert (args["working_dir"], args["user"], args["entrypoint"]) == ("/work", "1000:1000", ["python3", "-u"])
    assert parse_run_option(None) == {} and parse_run_option("  ") == {}


@pytest.mark.parametrize(
    "text,needle",
    [
        ("--cap-add NET_ADMIN", "'--cap-add' is not supported"),
        ("-d", "'-d' is not supported"),
        ("image:tag", "'image:tag' is not an option"),
        ("--cpus", "--cpus needs a value"),
        ("--cpus lots", "--cpus"),
        ("--privileged=yes", "--privileged takes no value"),
        ("--memory 12 parsecs", "'parsecs' is not an option"),
        ("-e UNSET_IN_MANAGER_XYZ", "UNSET_IN_MANAGER_XYZ is not set"),
        ("--gpus some", "--gpus"),
        ("--env 'unclosed", "cannot be parsed"),
        ("$(reboot)", "'$(reboot)' is not an option"),
    ],
)
def test_run_option_refuses_what_it_does_not_know_with_302(text, needle):
    from infinibrain.manager.run_options import parse_run_option

    with pytest.raises(InfinibrainException) as info:
        parse_run_option(text)
    assert info.value.code == 302 and needle in str(info.value)


def test_docker_config_needs_an_image_tag_and_valid_options():
    with pytest.raises(InfinibrainException) as info:
        normalize_config({"name": "d", "implementation_type": "docker"})
    assert info.value.code == 302 and "image_tag is required" in str(info.value)
    with pytest.raises(InfinibrainException) as info:
        normalize_config({"name": "d", "implementation_type": "nvidia", "image_tag": "x:1", "run_option": "--rm"})
    assert info.value.code == 302 and "--rm" in str(info.value)
    assert normalize_config({"name": "d", "image_tag": "x:1"}).implementation_type == "docker"


def test_snapshot_says_which_boards_an_edit_touched_and_undoes_it():
    from infinibrain.manager.changes import Snapshot

    config = normalize_config({"name": "cam", "implementation_type": "Loop"})
    reg = Registration("cam", config, {"a": Placement(), "b": Placement(distribution="off")})
    before = Snapshot.of(reg)
    reg.boards["b"].running = False
    reg.boards["c"] = Placement()
    assert before.touched(reg) == ["b", "c"]
    before.restore(reg)
    assert sorted(reg.boards) == ["a", "b"] and reg.boards["b"].running and reg.boards["b"].distribution == "off"
    reg.new_revision()  # new settings: every board gets new containers
    assert before.touched(reg) == ["a", "b"] and reg.revision == 2 and reg.next_revision == 3
    before.restore(reg)
    assert reg.revision == 1 and reg.next_revision == 3  # a revision number is never used twice


def test_locks_conflict_per_placement_and_per_inference():
    from infinibrain.manager.commands import WHOLE, Locks

    locks = Locks()
    locks.take([("cam", "b1")])
    assert locks.conflicts([("cam", "b2")]) == []  # another board of the same inference
    assert locks.conflicts([("cam", "b1")]) == ["cam"]
    assert locks.conflicts([("cam", WHOLE)]) == ["cam"]  # a change of the whole inference
    assert locks.conflicts([("mic", WHOLE)]) == []
    locks.take([("mic", WHOLE)])
    assert locks.conflicts([("mic", "b9")]) == ["mic"]
    locks.release([("cam", "b1")])
    assert locks.conflicts([("cam", WHOLE)]) == [] and locks.busy("mic") and not locks.busy("cam")


def test_restart_backoff_doubles_with_jitter_up_to_its_bound():
    from infinibrain.manager.restarts import Backoff

    b = Backoff(0.5, 30.0)
    delays = [b.next_delay() for _ in range(10)]
    assert 0.4 <= delays[0] <= 0.6 and 0.8 <= delays[1] <= 1.2 and all(d <= 36.0 for d in delays)
    assert 24.0 <= delays[-1] <= 36.0 and b.tries == 10
    b.reset()
    assert b.tries == 0 and b.next_delay() <= 0.6


def test_warmup_settings_are_checked(tmp_path):
    sample = tmp_path / "s.npy"
    sample.write_bytes(b"x")
    cfg = normalize_config({"name": "a", "implementation_type": "Loop", "warmup": str(sample), "ready_timeout": 5000})
    assert cfg.warmup == {"file": str(sample), "param": {}, "sub_inference_name": None} and cfg.ready_timeout == 5000
    for bad, needle in (("relative.npy", "absolute"), (str(tmp_path / "none.npy"), "cannot be read"),
                        ({"file": str(sample), "colour": 1}, "colour"),
                        ({"file": str(sample), "sub_inference_name": "nope"}, "nope")):
        with pytest.raises(InfinibrainException) as err:
            normalize_config({"name": "a", "implementation_type": "Loop", "warmup": bad})
        assert err.value.code == 302 and needle in str(err.value)


# ---- the allocator's tuning ---------------------------------------------------------------

MMAPPED_AFTER_4MB = r"""
import ctypes, os, sys
sys.path.insert(0, sys.argv[1])
from infinibrain import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = allocator.tune()
before = libc.mallinfo2().hblkhd
buf = bytearray(4 * 1024 * 1024)
print(tuned, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""),
                    reason="the tuning is glibc's mallopt")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_allocator_keeps_large_buffers_off_mmap(setting):
    """Tuned, a 4 MB buffer comes from the heap (freed, it stays for the next message);
    with INFINIBRAIN_MALLOC_TUNING=0 glibc maps it (and unmaps it when freed)."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, INFINIBRAIN_MALLOC_TUNING=setting)
    out = subprocess.run([sys.executable, "-c", MMAPPED_AFTER_4MB, root], env=env, capture_output=True, text=True, timeout=60)
    tuned, mapped = out.stdout.split()
    if setting == "1":
        assert tuned == "True" and int(mapped) < 1024 * 1024
    else:
        assert tuned == "False" and int(mapped) >= 4 * 1024 * 1024


def test_an_answer_with_odd_time_stamps_still_gives_a_response():
    """The client builds InferenceResponse.elapsed_time from the manager's stamps; stamps
    that are not [stage, seconds] leave it empty instead of failing the answer (a call
    whose answer failed to be read would wait for its deadline)."""
    from infinibrain._pending import Pending, response_of

    p = Pending("5", "infer", 0.0, inference="x", tid=3, param={"a": 1})
    good = response_of(p, 7, {"time_stamp": [["client_send", 1.0], ["manager_receive", 1.5]], "sub_inference_name": "m"})
    assert [e[0] for e in good.elapsed_time] == ["client_send->manager_receive", "manager_receive->client_receive", "total"]
    assert good.elapsed_time[0][1] == 0.5 and good.request_no == "5" and good.sub_inference_name == "m"
    odd = response_of(p, 7, {"time_stamp": [["client_send", "soon"], {"x": 1}]})
    assert odd.elapsed_time == [] and odd.time_stamp[-1][0] == "client_receive"


def test_result_arrays_round_trip_and_bad_ones_are_refused():
    from infinibrain import protocol as P

    value = {"a": np.arange(24, dtype=">i4").reshape(2, 3, 4), "e": np.zeros((0, 3), np.float16), "f": np.float32(0.5)}
    back = P.unpack_value(P.pack_value(value))
    for key in ("a", "e"):
        assert back[key].dtype == value[key].dtype and back[key].shape == value[key].shape
        assert np.array_equal(back[key], value[key])
    assert type(back["f"]) is float
    with pytest.raises(TypeError, match="objects"):
        P.pack_value(np.array([object()]))
    import msgpack
    import struct

    head = msgpack.packb(["<i8", [5]])
    lying = msgpack.ExtType(P.ARRAY_EXT, struct.pack("<I", len(head)) + head + np.arange(4).astype("<i8").tobytes())
    with pytest.raises(P.ProtocolError, match="needs"):
        P.unpack_value(msgpack.packb(lying))  # a shape its bytes do not fill


def test_stopping_a_loop_that_has_ended_touches_no_file():
    """Manager.stop may come (from a signal, a test's finally) after the loop has ended and
    closed its wake-up pipe, whose numbers another file may hold by then."""
    import os

    from infinibrain.manager.loop import Loop

    loop = Loop()
    wake_w = loop._wake_w
    loop.close()
    r, w = os.pipe()  # takes the numbers the loop let go of
    try:
        loop.stop()
        loop.call_soon(print)
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)  # nothing written into the pipe that now holds those numbers
        assert wake_w in (r, w)
    finally:
        os.close(r)
        os.close(w)
