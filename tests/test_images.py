"""Images for real models and real boards: built from a spec, shipped through the main
board's registry (only the layers a board lacks), arm64 under emulation, the in-container
library on Python 3.9 (and 3.8's grammar), image tags removed from boards, and a real
model (OpenCV's face detector on a real photograph) end to end."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SCRIPTS, _unavailable, connected, image_with_layer, running_manager
from infinibrain import ContainerConfig, InferenceModulesConfig, imagebuild
from infinibrain.errors import InfinibrainException

EXAMPLE = ROOT / "examples" / "face_detection"


def echo(name: str, image_tag: str, **kw) -> ContainerConfig:
    return ContainerConfig(**{**dict(name=name, implementation_type="docker", input="Main", output="Main", image_tag=image_tag,
                                     script_path=str(SCRIPTS), run_command="python3 echo.py",
                                     inference_modules=InferenceModulesConfig(sub_inference_name="echo", script="echo.py")),
                              **kw})


def need_image(kit, tag: str) -> None:
    if not kit.has_image(tag):
        _unavailable(f"image {tag} is missing; `make test` builds it first (scripts/prereqs.sh)")


@pytest.fixture(scope="module")
def im(docker_kit, tmp_path_factory):
    """A manager with one local Docker board, b1."""
    with running_manager(tmp_path_factory.mktemp("images"), boards=("b1",)) as m:
        yield m


# ---- arm64 and old Pythons ----------------------------------------------------------------------


def test_an_arm64_container_answers_under_emulation(docker_kit, im, name):
    need_image(docker_kit, "infinibrain/runtime:arm64")
    with connected(im) as c:
        c.load_inference(echo(name, "infinibrain/runtime:arm64", ready_timeout=120_000), "b1")
        result, response = c.infer(name, b"from amd64")
        assert result["machine"] == "aarch64" and result["shape"] == [10]
        assert response.metadata_sys["board"] == "b1"
        c.unload_inference(name, delete_image=False)


def test_the_container_library_runs_on_python_3_9(docker_kit, im, name):
    need_image(docker_kit, "infinibrain/runtime:bullseye")
    with connected(im) as c:
        c.load_inference(echo(name, "infinibrain/runtime:bullseye"), "b1")
        result = c.infer_image(name, np.arange(12, dtype=np.int32).reshape(3, 4))
        assert result["python"].startswith("3.9.") and result["sum"] == 66 and result["shape"] == [3, 4]
        c.unload_inference(name, delete_image=False)


BUILTIN_GENERICS = {"list", "dict", "tuple", "set", "frozenset", "type"}


def test_what_a_container_imports_is_python_3_8():
    """JetPack 5 runs Python 3.8: the modules ``import infinibrain.containers`` loads parse
    with 3.8's grammar and subscript no builtin type at run time (3.9's ``list[int]``)."""
    out = subprocess.run([sys.executable, "-c", "import sys, infinibrain.containers; "
                          "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith('infinibrain')))"],
                         capture_output=True, text=True, timeout=60, check=True)
    files = sorted(set(out.stdout.split()))
    assert any(f.endswith("connector.py") for f in files) and not any(f.endswith("inference.py") for f in files)
    for file in files:
        tree = ast.parse(Path(file).read_text(), feature_version=(3, 8))
        in_annotations = set()
        for node in ast.walk(tree):
            for ann in _annotations(node):
                in_annotations.update(id(n) for n in ast.walk(ann))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in BUILTIN_GENERICS
                    and id(node) not in in_annotations):
                pytest.fail(f"{file}:{node.lineno}: {node.value.id}[...] at run time needs Python 3.9")


def _annotations(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = node.args
        found = [a.annotation for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg] if a and a.annotation]
        return found + ([node.returns] if node.returns else [])
    if isinstance(node, ast.AnnAssign):
        return [node.annotation]
    return []


# ---- building from a spec -------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_an_image_built_from_a_spec_deploys_from_its_tar(docker_kit, im, name, tmp_path):
    tag = f"ib-test/spec-{name}:1"
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "echo.py").write_text((SCRIPTS / "echo.py").read_text())
    (tmp_path / "image.toml").write_text(
        f'[image]\ntag = "{tag}"\napt = ["jq"]\npip = ["six==1.16.0"]\n'
        'files = [{ from = "app", to = "/app" }]\nworkdir = "/app"\ncommand = ["python3", "echo.py"]\n'
        'env = { MODEL = "spec" }\nsave = "dist/spec.tar"\n')
    spec = imagebuild.load_spec(tmp_path / "image.toml")
    built = imagebuild.build(spec, client=docker_kit.client)
    assert built.tar == tmp_path / "dist" / "spec.tar" and built.tar_size > 100e6 and built.size > 100e6
    assert any("pip.whl/pip install" in step for step, _ in built.layers)
    client = docker_kit.client
    checked = client.containers.run(tag, ["sh", "-c", "jq --version && python3 -c 'import six; print(six.__version__)' "
                                          "&& ! python3 -m pip --version 2>/dev/null && ls /root/.cache 2>/dev/null | wc -l"],
                                    remove=True, network_mode="none").decode().split()
    assert checked[0].startswith("jq-") and checked[1] == "1.16.0" and checked[2] == "0"  # no pip, no cache left
    client.images.remove(tag)  # so that the load below comes from the tar
    with connected(im) as c:
        handler = c.load_inference(ContainerConfig(name=name, implementation_type="docker", image_tag=tag,
                                                   image_path=str(built.tar.parent), image_filename=built.tar.name,
                                                   input="Main", output="Main"), "b1")
        assert handler.deployment["image_bytes"] == built.tar_size
        assert c.infer(name, b"abc")[0]["cwd"] == "/app"
        c.unload_inference(name)  # the manager loaded it: delete_image removes it again
    assert not docker_kit.has_image(tag)


def _build(tmp_path, text: str, client):
    (tmp_path / "image.toml").write_text("[image]\n" + text)
    return imagebuild.build(imagebuild.load_spec(tmp_path / "image.toml"), client=client)


def test_a_failing_check_fails_the_build_naming_it_and_leaves_the_tag_as_it_was(docker_kit, name, tmp_path):
    tag = f"ib-test/check-{name}:1"
    (tmp_path / "app.py").write_text("print('v1')\n")
    first = _build(tmp_path, f'tag = "{tag}"\nfiles = [{{ from = "app.py", to = "/app/" }}]\ncheck = ["python3 /app/app.py"]\n',
                   docker_kit.client)
    assert first.checked == ["python3 /app/app.py"]
    (tmp_path / "app.py").write_text("print('v2')\n")
    with pytest.raises(InfinibrainException) as err:
        _build(tmp_path, f'tag = "{tag}"\nfiles = [{{ from = "app.py", to = "/app/" }}]\n'
                         'check = ["python3 /app/app.py", "import no_such_module_here"]\n', docker_kit.client)
    assert err.value.code == 302 and "import no_such_module_here" in str(err.value) and "ModuleNotFoundError" in str(err.value)
    assert docker_kit.client.images.get(tag).id == first.image_id  # the tag still names the image that passed
    assert not [t for i in docker_kit.client.images.list("ib-test/check-" + name) for t in i.tags if "candidate" in t]
    docker_kit.client.images.remove(tag)


@pytest.mark.timeout(600)
def test_pip_options_constraints_keep_and_what_pip_replaced(docker_kit, name, tmp_path):
    """Debian's msgpack is in the base: pip replacing it is named; ``keep`` forbids it.
    ``no_deps`` leaves a package's dependencies out; ``constraints`` choose versions."""
    client, tag = docker_kit.client, f"ib-test/pip-{name}:1"
    built = _build(tmp_path, f'tag = "{tag}"\npip = ["msgpack==1.1.0", "python-dateutil==2.9.0.post0", "packaging"]\n'
                             'no_deps = true\nconstraints = ["packaging==24.1"]\n', client)
    assert [(p, new) for p, _, new in built.replaced] == [("msgpack", "1.1.0")]
    listing = client.containers.run(tag, ["python3", "-c", "import importlib.metadata as m; print(m.version('packaging'), "
                                          "'six' in {d.metadata['Name'].lower() for d in m.distributions()})"],
                                    remove=True, network_mode="none").decode().split()
    assert listing == ["24.1", "False"]  # the constraint's version; dateutil's six left out (no_deps)
    client.images.remove(tag)
    with pytest.raises(InfinibrainException) as err:
        _build(tmp_path, f'tag = "{tag}"\npip = ["msgpack==1.1.0"]\nkeep = ["msgpack"]\n', client)
    assert err.value.code == 302 and "msgpack" in str(err.value)
    with pytest.raises(InfinibrainException, match="no Python package 'tensorflow'"):
        _build(tmp_path, f'tag = "{tag}"\npip = ["six"]\nkeep = ["tensorflow"]\n', client)
    assert not docker_kit.has_image(tag)


def test_bad_specs_are_refused_naming_the_key(tmp_path):
    for text, needle in (('[image]\ntag = "a:1"\ncolour = 1\n', "colour"), ("[image]\napt = []\n", "image.tag"),
                         ('[image]\ntag = "a:1"\nplatform = "linux/s390x"\n', "platform"),
                         ('[image]\ntag = "a:1"\nfiles = [{ from = "nope", to = "/app" }]\n', "nope"),
                         ('[image]\ntag = "a:1"\npip = "six"\n', "image.pip"),
                         ('[image]\ntag = "a:1"\nno_deps = "yes"\npip = ["six"]\n', "no_deps"),
                         ('[image]\ntag = "a:1"\nkeep = ["numpy"]\n', "give image.pip")):
        (tmp_path / "s.toml").write_text(text)
        with pytest.raises(InfinibrainException) as err:
            imagebuild.load_spec(tmp_path / "s.toml")
        assert needle in str(err.value)


# ---- old tags, and images the manager did not bring -----------------------------------------------


def test_image_tags_are_removed_from_boards_unless_in_use(docker_kit, im, name):
    client = docker_kit.client
    old, used = f"ib-test/old-{name}:1", f"ib-test/used-{name}:1"
    runtime = client.images.get("infinibrain/runtime:latest")
    runtime.tag(*old.split(":"))
    runtime.tag(*used.split(":"))
    try:
        with connected(im) as c:
            c.load_inference(echo(name, used), "b1")  # on the engine already: not brought by the manager
            rows = c.remove_images([old, used], "b1")
            assert {r["tag"]: r["removed"] for r in rows} == {old: True, used: False}
            assert next(r for r in rows if r["tag"] == used)["why"] == f"used by {name}"
            assert not docker_kit.has_image(old) and docker_kit.has_image(used)
            c.unload_inference(name)  # delete_image=True, but the manager did not bring it: kept
            assert docker_kit.has_image(used)
        out = subprocess.run([sys.executable, "-m", "infinibrain.cli", "--port", str(im.port), "images", "rm", used],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and f"b1: {used}: removed" in out.stdout
        assert not docker_kit.has_image(used)
    finally:
        for tag in (old, used):
            if docker_kit.has_image(tag):
                client.images.remove(tag)


# ---- shipping only what changed -------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_boards_pull_only_the_layers_they_lack_through_the_registry(docker_kit, ssh_boards, tmp_path, name):
    kit = docker_kit
    if kit.has_image(kit.tag):
        kit.client.images.remove(kit.tag)
    registry = {b: {"image_transfer": "registry"} for b in ("b1", "b2")}
    m = ssh_boards.manager(tmp_path / "m", overrides=registry).start()
    try:
        with connected(m) as c:
            cfg = dict(name=name, implementation_type="docker", input="Main", output="Main", image_tag=kit.tag,
                       image_path=str(kit.tar.parent), image_filename=kit.tar.name)
            first = c.load_inference(ContainerConfig(**cfg), "all")
            pulled = [h.deployment for h in first if h.deployment.get("via") == "registry"]
            # The emulated boards share one engine, which has every layer of this image already
            # (it is the example classifier under another tag): the pull moves its manifest and
            # config only, once for both boards.
            assert len(pulled) == 1 and 0 < pulled[0]["image_bytes"] < 1e6 < kit.tar.stat().st_size
            assert c.infer_image(name, np.zeros((48, 48, 3), np.uint8))["label"]
            assert "pulled" in m.log() and "through the registry" in m.log()
            # Two updates, each a new 3 MB model on top of the same layers. The first moves the
            # layers below once (compressed: this engine had them from a tar, never from this
            # registry); the second only its new top layer.
            moved = []
            for version in (2, 3):
                new_tag = f"ib-test/classifier-{name}:{version}"
                tar = image_with_layer(kit.client, kit.tag, new_tag, tmp_path, 3, seed=version)
                kit.client.images.remove(new_tag)
                handlers = c.load_inference(ContainerConfig(**{**cfg, "image_tag": new_tag, "image_filename": tar.name,
                                                               "image_path": str(tar.parent), "force_update": True}), "all")
                moved += [h.deployment["image_bytes"] for h in handlers if h.deployment.get("via") == "registry"]
                assert c.infer_image(name, np.zeros((48, 48, 3), np.uint8))["label"]
            assert len(moved) == 2 and moved[0] < tar.stat().st_size and 3e6 < moved[1] < 6e6, moved
            c.unload_inference(name)
        assert "127.0.0.1:" in m.log() and "leads to the main board's 127.0.0.1" in m.log()
    finally:
        m.stop()
        m.cleanup()
        for tag in (kit.tag, f"ib-test/classifier-{name}:2", f"ib-test/classifier-{name}:3"):
            if kit.has_image(tag):
                kit.client.images.remove(tag)


# ---- a real model ----------------------------------------------------------------------------------


def test_faces_are_found_in_a_real_photograph(docker_kit, im, name):
    spec = imagebuild.load_spec(EXAMPLE / "image.toml")
    need_image(docker_kit, spec.tag)
    sys.path.insert(0, str(EXAMPLE))
    from photo import photo

    png = photo()
    with connected(im) as c:
        c.load_inference(ContainerConfig(name=name, implementation_type="docker", image_tag=spec.tag,
                                         input="Main", output="Main"), "b1")
        result, _ = c.infer(name, png)
        assert result["size"] == [512, 512] and len(result["faces"]) == 1
        face = result["faces"][0]
        # Eileen Collins' face: in the upper middle of the picture
        assert 150 < face["x"] + face["w"] / 2 < 260 and 50 < face["y"] + face["h"] / 2 < 160, face
        c.unload_inference(name, delete_image=False)
    out = subprocess.run([sys.executable, str(EXAMPLE / "run.py"), "--board", "b1", "--port", str(im.port)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "1 face(s)" in out.stdout and "face at x=" in out.stdout
    with connected(im) as c:  # the example leaves nothing registered
        assert "faces" not in [h.name for h in c.get_container_handler()]
