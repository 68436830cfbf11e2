"""Models served from their files with no code (issue 26): a real manager, real process
and Docker containers, real ONNX Runtime; the models are made here with the onnx package."""
from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="ONNX Runtime is part of the test extra: pip install -e '.[test]'")
pytest.importorskip("onnx", reason="the onnx package is part of the test extra")

from infinibrain import ContainerConfig, InferenceModulesConfig  # noqa: E402
from infinibrain.errors import InfinibrainException, InvalidArgumentException  # noqa: E402

import onnx_models  # noqa: E402


def model_config(name: str, folder: Path, model: str, **module) -> ContainerConfig:
    return ContainerConfig(name=name, implementation_type="process", input="Main", output="Main", script_path=str(folder),
                           inference_modules=InferenceModulesConfig(sub_inference_name="m", model=model, **module))


def test_a_model_file_serves_with_no_script_on_a_process_board(cluster, name, tmp_path):
    onnx_models.affine(tmp_path / "affine.onnx")
    cluster.load_inference(model_config(name, tmp_path, "affine.onnx"), "local")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = onnx_models.in_process(tmp_path / "affine.onnx", {"x": x})[0]
    result = cluster.infer_image(name, x)  # with the batch dimension
    assert set(result) == {"y"} and result["y"].dtype == np.float32 and result["y"].shape == (2, 3)
    assert np.allclose(result["y"], expected, rtol=1e-6)
    one = cluster.infer_image(name, x[1])  # without it: the answer has none either
    assert one["y"].shape == (3,) and np.allclose(one["y"], expected[1], rtol=1e-6)
    with pytest.raises(InvalidArgumentException) as err:
        cluster.infer_image(name, x.astype(np.float64))
    assert err.value.code == 100 and "'x' float32 [N, 4]" in str(err.value) and "float64" in str(err.value)
    with pytest.raises(InvalidArgumentException, match="infer_image"):
        cluster.infer(name, b"not an array")  # the input is no image: bytes cannot be decoded into it
    with pytest.raises(InvalidArgumentException, match="dimension 1"):
        cluster.infer_image(name, np.zeros((2, 5), np.float32))
    assert np.allclose(cluster.infer_image(name, x)["y"], expected, rtol=1e-6)  # it goes on serving
    cluster.unload_inference(name)


def test_concurrent_callers_each_get_their_own_answer_from_a_batched_model(cluster, name, tmp_path):
    onnx_models.affine(tmp_path / "affine.onnx")
    cluster.load_inference(model_config(name, tmp_path, "affine.onnx"), "local")
    before = cluster.stats()["batches"]
    rows = [np.full((1, 4), i, dtype=np.float32) for i in range(64)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: cluster.infer_image(name, r)["y"], rows))
    for row, answer in zip(rows, answers):
        assert np.allclose(answer, row @ onnx_models.WEIGHTS + onnx_models.BIAS, rtol=1e-6)
    after = cluster.stats()["batches"]  # the runner asked for batches: its model's first dimension is open
    assert after["messages"] > before["messages"] and after["requests"] - before["requests"] >= 2 * (after["messages"] - before["messages"])
    cluster.unload_inference(name)


def test_an_encoded_image_sent_with_infer_is_decoded_for_an_image_model(cluster, name, tmp_path):
    onnx_models.channel_mean(tmp_path / "mean.onnx", size=8)
    cluster.load_inference(model_config(name, tmp_path, "mean.onnx"), "local")
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[..., 0], pixels[..., 2] = 255, 51  # red full, blue a fifth: resizing keeps flat colours
    result, _ = cluster.infer(name, onnx_models.png(pixels))
    assert result["mean"].shape == (3,) and np.allclose(result["mean"], [1.0, 0.0, 0.2], atol=1e-6)
    with pytest.raises(InvalidArgumentException, match="Pillow can decode"):
        cluster.infer(name, b"\x89PNG but not really")
    cluster.unload_inference(name)


def test_hooks_run_around_the_model(cluster, name, tmp_path):
    onnx_models.affine(tmp_path / "affine.onnx")
    (tmp_path / "hooks.py").write_text(
        "import numpy as np\n"
        "def preprocess(data, param):\n"
        "    return np.frombuffer(bytes(data), dtype=np.uint8).astype(np.float32).reshape(-1, 4) * param.get('scale', 1)\n"
        "def postprocess(outputs, param):\n"
        "    return {'best': int(outputs['y'].argmax(axis=-1)[0]), 'sum': float(outputs['y'].sum())}\n")
    cluster.load_inference(model_config(name, tmp_path, "affine.onnx", hooks="hooks.py", model_tag="v3"), "local")
    result, response = cluster.infer(name, bytes([1, 2, 3, 4]), {"scale": 2})
    assert response.metadata_sys["model_tag"] == "v3"  # what was deployed, said by the manager
    y = np.array([[2, 4, 6, 8]], np.float32) @ onnx_models.WEIGHTS + onnx_models.BIAS
    assert result == {"best": int(y.argmax()), "sum": pytest.approx(float(y.sum()), rel=1e-6)}
    cluster.unload_inference(name)


def test_a_broken_model_file_fails_its_load_naming_it(cluster, name, tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"this is not a model")
    cfg = model_config(name, tmp_path, "broken.onnx")
    with pytest.raises(InfinibrainException) as err:
        cluster.load_inference(cfg, "local")
    assert err.value.code == 302 and "broken.onnx" in str(err.value) and "ONNX Runtime" in str(err.value)
    missing = model_config(name + "b", tmp_path, "absent.onnx")
    with pytest.raises(InfinibrainException) as err:
        cluster.load_inference(missing, "local")
    assert err.value.code == 302 and "absent.onnx" in str(err.value)
    onnx_models.affine(tmp_path / "affine.onnx")  # the rest of the cluster serves on
    cluster.load_inference(model_config(name + "c", tmp_path, "affine.onnx"), "local")
    assert cluster.infer_image(name + "c", np.ones(4, np.float32))["y"].shape == (3,)
    cluster.unload_inference(name + "c")
    for n in (name, name + "b"):
        try:
            cluster.unload_inference(n)
        except InfinibrainException:
            pass


def test_runner_options_are_checked_when_the_inference_is_registered(cluster, name, tmp_path):
    onnx_models.affine(tmp_path / "affine.onnx")
    with pytest.raises(InvalidArgumentException, match="providers"):
        cluster.load_inference(model_config(name, tmp_path, "affine.onnx", providers=[3]), "local")
    with pytest.raises(InvalidArgumentException, match="threads"):
        cluster.load_inference(model_config(name, tmp_path, "affine.onnx", threads=0), "local")
    cfg = model_config(name, tmp_path, "affine.onnx", providers=["NoSuchExecutionProvider"])
    with pytest.raises(InfinibrainException) as err:
        cluster.load_inference(cfg, "local")
    assert err.value.code == 302 and "NoSuchExecutionProvider" in str(err.value)
    try:
        cluster.unload_inference(name)
    except InfinibrainException:
        pass


# ---- Docker boards: the runtime-onnx images (amd64, and arm64 under emulation) ----------------


@pytest.fixture(scope="module")
def docker_models(docker_kit, tmp_path_factory):
    """A manager with one local Docker board, d1."""
    from conftest import running_manager

    with running_manager(tmp_path_factory.mktemp("models"), boards=("d1",)) as m:
        yield m


@pytest.mark.parametrize("tag", ["latest", "arm64"])
def test_a_model_file_serves_with_no_script_on_a_docker_board(docker_kit, docker_models, name, tmp_path, tag):
    from conftest import _unavailable, connected

    image = f"infinibrain/runtime-onnx:{tag}"
    if not docker_kit.has_image(image):
        _unavailable(f"image {image} is missing; `make test` builds it first (scripts/prereqs.sh)")
    onnx_models.affine(tmp_path / "affine.onnx")
    cfg = ContainerConfig(name=name, implementation_type="docker", input="Main", output="Main", image_tag=image,
                          script_path=str(tmp_path), ready_timeout=120_000,
                          inference_modules=InferenceModulesConfig(sub_inference_name="m", model="affine.onnx", model_tag="7"))
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    with connected(docker_models) as c:
        c.load_inference(cfg, "d1")
        result = c.infer_image(name, x)
        assert result["y"].dtype == np.float32 and result["y"].shape == (3, 3)
        assert np.allclose(result["y"], onnx_models.in_process(tmp_path / "affine.onnx", {"x": x})[0], rtol=1e-5, atol=1e-6)
        c.unload_inference(name, delete_image=False)


# ---- real networks from a PyPI wheel: PP-OCR (examples/ocr) -----------------------------------


def ppocr() -> Path:
    from conftest import ROOT
    from infinibrain.imagebuild import cache_dir

    folder = cache_dir() / "ppocr"
    if not (folder / "det.onnx").exists():
        pytest.skip(f"PP-OCR's models are not in {folder}; `make test` fetches them (python {ROOT}/examples/ocr/ppocr.py)")
    return folder


def ocr_example():
    """examples/ocr's run module (its configs) and its text_image."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "examples" / "ocr"))
    try:
        import run as ocr
        from ppocr import text_image
    finally:
        sys.path.pop(0)
    return ocr, text_image


def test_a_real_network_answers_as_onnx_runtime_does_in_process(cluster, name, tmp_path):
    models = ppocr()
    cfg = ContainerConfig(name=name, implementation_type="process", input="Main", output="Main",
                          copy={"From": str(models / "det.onnx"), "To": "/"},
                          inference_modules=InferenceModulesConfig(sub_inference_name="det", model="det.onnx"))
    cluster.load_inference(cfg, "local")
    rng = np.random.default_rng(26)
    image = rng.uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    served = cluster.infer_image(name, image)
    expected = onnx_models.in_process(models / "det.onnx", {"x": image})[0]
    (output,) = served.values()
    assert output.dtype == expected.dtype and output.shape == expected.shape == (1, 1, 224, 224)
    assert np.allclose(output, expected, rtol=1e-4, atol=1e-5)  # the same runtime; thread counts may differ
    cluster.unload_inference(name)


def test_the_ocr_example_reads_text_through_models_calling_models(cluster, name):
    ocr, text_image = ocr_example()
    configs = ocr.configs("process", ppocr(), prefix=name)
    for cfg in configs:
        cluster.load_inference(cfg, "local")
    try:
        result = cluster.infer_image(name, text_image("HELLO 2026"))
        assert [line["text"] for line in result["lines"]] == ["HELLO 2026"]
        assert result["lines"][0]["score"] > 0.9
        assert cluster.infer_image(name, text_image("infinibrain"))["lines"][0]["text"] == "infinibrain"
    finally:
        for cfg in configs:
            cluster.unload_inference(cfg.name)


def test_the_ocr_example_on_a_docker_board_from_its_image(docker_kit, docker_models, name):
    from conftest import _unavailable, connected

    if not docker_kit.has_image("infinibrain/ocr:1"):
        _unavailable("image infinibrain/ocr:1 is missing; `make test` builds it first (examples/ocr/image.toml)")
    image = docker_kit.client.images.get("infinibrain/ocr:1")
    assert image.attrs["Size"] < 947e6 / 2  # the first try weighed 947 MB
    ocr, text_image = ocr_example()
    configs = ocr.configs("docker", Path("/unused"), prefix=name)
    with connected(docker_models) as c:
        for cfg in configs:
            c.load_inference(cfg, "d1")
        try:
            assert [line["text"] for line in c.infer_image(name, text_image("HELLO 2026"))["lines"]] == ["HELLO 2026"]
        finally:
            for cfg in configs:
                c.unload_inference(cfg.name, delete_image=False)


def test_a_script_path_that_holds_the_managers_state_is_refused(fresh_manager, name, tmp_path):
    """Its copy would copy itself until paths grew too long (seen: a 999 kilobytes long)."""
    from conftest import connected

    m = fresh_manager().start()
    onnx_models.affine(tmp_path / "affine.onnx")
    with connected(m) as c:
        with pytest.raises(InfinibrainException) as err:
            c.load_inference(model_config(name, tmp_path, "affine.onnx"), "local")  # tmp_path holds the manager's folder
        assert err.value.code == 302 and "state_dir" in str(err.value) and len(str(err.value)) < 1000
