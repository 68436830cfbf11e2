"""Docker boards against a real Docker engine: the reference flow on two emulated boards,
settings (script_path, copy, run_option), failures, and manager restarts.

The ``docker_kit`` fixture starts an engine and builds the images when it can, and skips
these tests with the reason when it cannot (never in CI, which sets
INFINIBRAIN_REQUIRE_DOCKER=1).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import SCRIPTS, connected, running_manager, wait_for
from infinibrain import ContainerConfig, InferenceModulesConfig
from infinibrain.errors import InfinibrainException

RUNTIME = "infinibrain/runtime:latest"


@pytest.fixture(scope="module")
def dm(docker_kit, tmp_path_factory):
    """A manager with two boards, b1 and b2, on this machine's Docker engine."""
    with running_manager(tmp_path_factory.mktemp("docker"), boards=("b1", "b2")) as m:
        yield m


@pytest.fixture
def dcluster(dm):
    with connected(dm) as c:
        yield c


def classifier(kit, name: str, **kw) -> ContainerConfig:
    base = dict(name=name, implementation_type="docker", input="Main", output="Main",
                image_path=str(kit.tar.parent), image_filename=kit.tar.name, image_tag=kit.tag)
    return ContainerConfig(**{**base, **kw})


def echo(name: str, **kw) -> ContainerConfig:
    base = dict(name=name, implementation_type="docker", input="Main", output="Main", image_tag=RUNTIME,
                script_path=str(SCRIPTS), run_command="python3 echo.py",
                inference_modules=InferenceModulesConfig(sub_inference_name="echo", script="echo.py"))
    return ContainerConfig(**{**base, **kw})


def colour(channel: int) -> np.ndarray:
    img = np.zeros((48, 48, 3), np.uint8)
    img[..., channel] = 230
    return img


def served_by(cluster, name: str, n: int = 6) -> set[str]:
    """The boards that answered ``n`` requests."""
    boards, done = [], threading.Semaphore(0)

    def cb(code, message, result, response):
        boards.append((code, response.metadata_sys.get("board") if response else None))
        done.release()

    for _ in range(n):
        cluster.infer_image_async(name, colour(0), func=cb)
    for _ in range(n):
        assert done.acquire(timeout=30)
    assert all(code == 0 for code, _ in boards), boards
    return {b for _, b in boards}


def refused(call, code: int) -> str:
    with pytest.raises(InfinibrainException) as info:
        call()
    assert info.value.code == code, str(info.value)
    return str(info.value)


def test_reference_flow_on_two_docker_boards(docker_kit, dm, dcluster, name):
    kit = docker_kit
    assert not kit.has_image(kit.tag)

    # load on "all": the image comes from the tar, one labelled container per board
    handlers = dcluster.load_inference(classifier(kit, name), "all")
    assert sorted(h.suffix_name for h in handlers) == [f"{name}-b1", f"{name}-b2"]
    assert handlers[0].image_tag == kit.tag and handlers[0].image_file == kit.tar.name
    assert kit.has_image(kit.tag)
    made = [c for c in kit.containers(dm) if c.labels["infinibrain.inference"] == name]
    assert sorted(c.labels["infinibrain.board"] for c in made) == ["b1", "b2"]
    for c in made:
        assert c.attrs["HostConfig"]["NetworkMode"] == "host"
        assert f"INFINIBRAIN_CONTAINER={c.labels['infinibrain.suffix']}" in c.attrs["Config"]["Env"]

    # infer_image: the example classifier answers from inside its container
    for channel, label in ((0, "red"), (1, "green"), (2, "blue")):
        assert dcluster.infer_image(name, colour(channel))["label"] == label

    # distribution off on one board sends everything to the other
    b1, b2 = dcluster.get_coprocessor_handler(name)
    b1.stop_distribution(name)
    assert served_by(dcluster, name) == {"b2"}
    b1.start_distribution(name)
    b2.stop_distribution(name)
    assert served_by(dcluster, name) == {"b1"}
    b2.start_distribution(name)

    # status: the engine's figures and ours
    rows = {s.suffix_name: s for s in dcluster.get_container_status(name)}
    assert set(rows) == {f"{name}-b1", f"{name}-b2"}
    for s in rows.values():
        assert s.status == "running" and s.connect_status == "connected" and s.operate == "Free"
        assert s.cpu_proc.endswith("%") and "/" in s.mem_usage and s.mem_proc.endswith("%")
        assert s.created.startswith("20") and "/" in s.block_io and "/" in s.net_io
        assert s.implementation_type == "docker" and s.image_tag == kit.tag

    # images: the engine's, per board
    for images in dcluster.get_coprocessor_images(name):
        assert images.name in ("b1", "b2")
        assert any(kit.tag in i["tags"] for i in images.images)
    assert any(kit.tag in i["tags"] for i in b1.get_images()[0].images)

    # put_file into the running containers, in a folder that did not exist
    note = dm.tmp / "note.txt"
    note.write_text("put by the test\n")
    dcluster.put_file(name, {"file": str(note), "To": "/data/in/"})
    for c in made:
        out = c.exec_run(["cat", "/data/in/note.txt"])
        assert out.exit_code == 0 and out.output == b"put by the test\n"
        assert c.exec_run(["ls", "-a", "/data/in"]).output.split() == [b".", b"..", b"note.txt"]

    # stop one container: the other serves; start it again: both serve
    h1 = next(h for h in handlers if h.allocated_coprocessor == "b1")
    stopped = h1.stop()
    assert stopped.status.startswith("exited") and stopped.connect_status == "disconnected"
    assert served_by(dcluster, name) == {"b2"}
    started = h1.start()
    assert started.status == "running"
    wait_for(lambda: {s.connect_status for s in dcluster.get_container_status(name)} == {"connected"}, 20)
    b2.stop_distribution(name)
    assert served_by(dcluster, name) == {"b1"}  # the restarted container serves
    b2.start_distribution(name)
    # a stop keeps the container, so what put_file wrote is still there
    assert kit.client.containers.get(made[0].id).exec_run(["cat", "/data/in/note.txt"]).exit_code == 0

    # logs come from the engine
    assert "classifier ready" in dcluster.get_container_logs(f"{name}-b1", "b1")

    # a second inference on the same image keeps it alive through the first one's unload
    other = name + "x"
    dcluster.load_inference(classifier(kit, other), "b1")
    dcluster.unload_inference(name, delete_image=True)
    assert not [c for c in kit.containers(dm) if c.labels["infinibrain.inference"] == name]
    assert kit.has_image(kit.tag)
    assert dcluster.infer_image(other, colour(2))["label"] == "blue"
    dcluster.unload_inference(other, delete_image=True)
    assert not [c for c in kit.containers(dm) if c.labels["infinibrain.inference"] == other]
    assert not kit.has_image(kit.tag)


def test_script_path_copy_and_run_option(docker_kit, dm, dcluster, name, tmp_path):
    extra = tmp_path / "extra"
    (extra / "sub").mkdir(parents=True)
    (extra / "sub" / "deep.txt").write_text("deep\n")
    cfg = echo(
        name,
        run_option="-e ECHO_SUB=echo --env ECHO_MARK=m1 -w /srv/app --shm-size=64m --cpus 1.5 --memory 256m",
        copy=[{"From": str(SCRIPTS / "sink.py"), "To": "/etc/cop/"}, {"From": str(extra), "To": "/opt/"}],
    )
    dcluster.load_inference(cfg, "b1")
    answer = dcluster.infer_image(name, colour(0), {"read": "/etc/cop/sink.py"})
    assert answer["cwd"] == "/srv/app" and "echo.py" in answer["cwd_files"]
    assert answer["read"] == (SCRIPTS / "sink.py").read_text()
    assert answer["env"]["INFINIBRAIN_CONTAINER"] == f"{name}-b1" and answer["env"]["ECHO_MARK"] == "m1"
    assert answer["sub"] == "echo" and answer["board"] == "b1"
    assert dcluster.infer_image(name, colour(0), {"read": "/opt/extra/sub/deep.txt"})["read"] == "deep\n"
    host = next(c for c in docker_kit.containers(dm) if c.labels["infinibrain.inference"] == name).attrs["HostConfig"]
    assert host["ShmSize"] == 64 * 1024 * 1024 and host["NanoCpus"] == 1_500_000_000 and host["Memory"] == 256 * 1024 * 1024
    dcluster.unload_inference(name, delete_image=False)
    assert docker_kit.has_image(RUNTIME)


@pytest.mark.parametrize(
    "option, named",
    [("--cap-add SYS_ADMIN", "--cap-add"), ("--rm", "--rm"), ("; rm -rf /", "';'"), ("-p 80:80", "-p"), ("--cpus", "--cpus needs a value")],
)
def test_unsupported_run_option_is_302_naming_it(docker_kit, dm, dcluster, name, option, named):
    message = refused(lambda: dcluster.load_inference(echo(name, run_option=option), "b1"), 302)
    assert named in message
    refused(lambda: dcluster.get_container_handler(name), 300)
    assert not [c for c in docker_kit.containers(dm) if c.labels["infinibrain.inference"] == name]


def test_missing_and_corrupt_image_files_are_302(docker_kit, dm, dcluster, name, tmp_path):
    absent = f"ib-test/absent:{name}"
    message = refused(lambda: dcluster.load_inference(
        ContainerConfig(name=name, implementation_type="docker", image_tag=absent, image_path=str(tmp_path), image_filename="none.tar"), "b1"), 302)
    assert "none.tar" in message and "cannot be opened" in message
    (tmp_path / "bad.tar").write_bytes(b"this is not a docker save tar" * 100)
    message = refused(lambda: dcluster.load_inference(
        ContainerConfig(name=name, implementation_type="docker", image_tag=absent, image_path=str(tmp_path), image_filename="bad.tar"), "b1"), 302)
    assert "bad.tar" in message and "could not be loaded" in message
    message = refused(lambda: dcluster.load_inference(
        ContainerConfig(name=name, implementation_type="docker", image_tag=absent), "b1"), 302)
    assert absent in message and "image_path" in message
    refused(lambda: dcluster.get_container_handler(name), 300)
    assert not [c for c in docker_kit.containers(dm) if c.labels["infinibrain.inference"] == name]
    assert not docker_kit.has_image(absent)


def test_container_exiting_at_start_is_302_with_its_last_lines(docker_kit, dm, dcluster, name):
    message = refused(lambda: dcluster.load_inference(echo(name, run_command="python3 failstart.py"), "all"), 302)
    assert "exited with status 7" in message and "model file missing" in message
    assert not [c for c in docker_kit.containers(dm) if c.labels["infinibrain.inference"] == name]
    message = refused(lambda: dcluster.load_inference(echo(name, run_command="no-such-program --x"), "b1"), 302)
    assert "no-such-program" in message
    assert not [c for c in docker_kit.containers(dm) if c.labels["infinibrain.inference"] == name]


def test_nvidia_needs_the_nvidia_runtime(docker_kit, dm, dcluster, name):
    if "nvidia" in docker_kit.client.info().get("Runtimes", {}):
        pytest.skip("this engine has the NVIDIA runtime; the refusal cannot be shown here")
    message = refused(lambda: dcluster.load_inference(echo(name, implementation_type="nvidia"), "b1"), 302)
    assert "'nvidia' runtime" in message and "b1" in message
    assert not [c for c in docker_kit.containers(dm) if c.labels["infinibrain.inference"] == name]


def test_changed_image_tag_is_203_unless_force_update(docker_kit, dm, dcluster, name):
    dcluster.load_inference(echo(name), "b1")
    message = refused(lambda: dcluster.load_inference(echo(name, image_tag="infinibrain/example-classifier:latest", run_command=None), "b1"), 203)
    assert RUNTIME in message
    dcluster.load_inference(echo(name, image_tag="infinibrain/example-classifier:latest", run_command=None, force_update=True), "b1")
    assert dcluster.infer_image(name, colour(1))["label"] == "green"
    (c,) = [c for c in docker_kit.containers(dm) if c.labels["infinibrain.inference"] == name]
    assert c.image.tags == ["infinibrain/example-classifier:latest"]
    dcluster.unload_inference(name, delete_image=False)


def test_unreachable_engine_is_500_and_other_boards_go_on(docker_kit, fresh_manager, name):
    m = fresh_manager(boards=("b1", "down"), board_settings={"down": {"docker_host": "unix:///nonexistent/docker.sock"}}).start()
    with connected(m) as c:
        message = refused(lambda: c.load_inference(echo(name), "down"), 500)
        assert "not reachable" in message and "/nonexistent/docker.sock" in message
        refused(lambda: c.get_container_handler(name), 300)
        c.load_inference(echo(name), "b1")
        assert c.infer_image(name, colour(0))["board"] == "b1"
        assert [i.name for i in c.get_coprocessor_images("")] == ["b1", "down"]  # no docker inference on "down": listed without engine images
        c.unload_inference(name, delete_image=False)


def test_manager_restart_brings_containers_back_and_reload_recreates_them(docker_kit, fresh_manager, name):
    m = fresh_manager(boards=("b1", "b2")).start()
    with connected(m) as c:
        c.load_inference(echo(name), "all")
        before = {x.labels["infinibrain.board"]: x.id for x in docker_kit.containers(m)}
    m.stop()  # a clean stop stops the containers; the registry still wants them
    assert {x.status for x in docker_kit.containers(m)} == {"exited"}
    m.start()
    with connected(m) as c:
        wait_for(lambda: all(s.connect_status == "connected" for s in c.get_container_status(name)), 30)
        assert {x.labels["infinibrain.board"]: x.id for x in docker_kit.containers(m)} == before  # restarted, not remade
        c.reload_inference(name)
        after = {x.labels["infinibrain.board"]: x.id for x in docker_kit.containers(m)}
        assert set(after) == {"b1", "b2"} and not set(after.values()) & set(before.values())
        assert {c.infer_image(name, colour(0))["board"] for _ in range(4)} <= {"b1", "b2"}
        c.unload_inference(name, delete_image=False)


def test_sigkilled_manager_adopts_its_running_containers(docker_kit, fresh_manager, name):
    m = fresh_manager(boards=("b1",)).start()
    with connected(m) as c:
        c.load_inference(echo(name), "b1")
        (before,) = docker_kit.containers(m)
    m.kill()
    m.start()
    with connected(m) as c:
        assert c.infer_image(name, colour(0))["board"] == "b1"
        (after,) = docker_kit.containers(m)  # the same container, never a second one
        assert after.id == before.id and after.attrs["State"]["StartedAt"] == before.attrs["State"]["StartedAt"]
        c.unload_inference(name, delete_image=False)


def test_container_killed_on_the_engine_is_402_and_114_then_start_brings_it_back(docker_kit, dm, dcluster, name):
    events = []
    dcluster.set_callback(manage_callback=lambda code, msg, cmd, result: events.append((code, cmd, result)))
    dcluster.load_inference(echo(name), "b1")
    (container,) = [c for c in docker_kit.containers(dm) if c.labels["infinibrain.inference"] == name]
    dcluster.infer_image_async(name, colour(0), {"sleep": 30}, func=lambda *a: events.append(("infer", a[0])))
    wait_for(lambda: dcluster.get_container_status(name)[0].send_data_num == 1, 10)
    container.kill()  # behind the manager's back, mid-request
    wait_for(lambda: ("infer", 402) in events and any(e[0] == 114 for e in events), 15)
    assert next(e for e in events if e[0] == 114)[2]["suffix_name"] == f"{name}-b1"
    wait_for(lambda: dcluster.get_container_status(name)[0].status.startswith("exited"), 10)
    (handler,) = dcluster.get_container_handler(name)
    assert handler.start().connect_status == "connected"
    (again,) = [c for c in docker_kit.containers(dm) if c.labels["infinibrain.inference"] == name]
    assert again.id == container.id  # the same container, started again
    assert dcluster.infer_image(name, colour(0))["board"] == "b1"
    dcluster.unload_inference(name, delete_image=False)


def test_an_update_with_a_missing_tar_touches_nothing(docker_kit, dm, dcluster, name, tmp_path):
    """A typo in the new tar's name: refused before any container stops; the old ones serve on."""
    dcluster.load_inference(echo(name), "all")
    before = {c.id for c in docker_kit.containers(dm) if c.labels["infinibrain.inference"] == name}
    assert len(before) == 2
    with pytest.raises(InfinibrainException) as err:
        dcluster.load_inference(echo(name, image_tag=f"ib-test/absent:{name}", image_path=str(tmp_path),
                                     image_filename="clasifier.tar", force_update=True), "all")
    assert err.value.code == 302 and "clasifier.tar" in str(err.value) and "cannot be opened" in str(err.value)
    running = [c for c in docker_kit.containers(dm) if c.labels["infinibrain.inference"] == name]
    assert {c.id for c in running} == before and all(c.status == "running" for c in running)
    assert served_by(dcluster, name, 8) == {"b1", "b2"}
    assert dcluster.get_container_handler(name)[0].image_tag == RUNTIME
    # A rolling update on Docker boards: new containers, then the old ones go.
    dcluster.load_inference(echo(name, max_send_num=3, force_update=True), "all")
    after = {c.id for c in docker_kit.containers(dm) if c.labels["infinibrain.inference"] == name}
    assert len(after) == 2 and not after & before
    assert served_by(dcluster, name, 8) == {"b1", "b2"}
    dcluster.unload_inference(name, delete_image=False)
