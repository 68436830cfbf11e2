"""The public names and signatures are the reference's (SDK_REFERENCE.md)."""
from __future__ import annotations

import inspect

import pytest

import infinibrain
from infinibrain import errors, types
from infinibrain.container import ContainerHandler
from infinibrain.containers import Connector
from infinibrain.coprocessor import CoprocessorHandler
from infinibrain.inference import AICluster

SIGNATURES = {
    (AICluster, "set_callback"): [("infer_callback", None), ("manage_callback", None)],
    (AICluster, "load_inference_async"): [("container_config", ...), ("coprocessor_name", ...), ("func", None)],
    (AICluster, "load_inference"): [("container_config", ...), ("coprocessor_name", ...)],
    (AICluster, "release"): [],
    (AICluster, "unload_inference_async"): [("inference_name", ""), ("coprocessor_name", ""), ("delete_image", True), ("func", None)],
    (AICluster, "unload_inference"): [("inference_name", ""), ("coprocessor_name", ""), ("delete_image", True)],
    (AICluster, "get_coprocessor_handler_async"): [("inference_name", ""), ("func", None)],
    (AICluster, "get_coprocessor_handler"): [("inference_name", "")],
    (AICluster, "get_coprocessor_images_async"): [("inference_name", ""), ("func", None)],
    (AICluster, "get_coprocessor_images"): [("inference_name", "")],
    (AICluster, "get_container_handler_async"): [("inference_name", ""), ("func", None)],
    (AICluster, "get_container_handler"): [("inference_name", "")],
    (AICluster, "get_container_status_async"): [("inference_name", ""), ("func", None)],
    (AICluster, "get_container_status"): [("inference_name", "")],
    (AICluster, "infer_image_async"): [("inference_name", ...), ("image_data", ...), ("param", {}), ("func", None)],
    (AICluster, "infer_image"): [("inference_name", ...), ("image_data", ...), ("param", {})],
    (AICluster, "get_logger"): [],
    (AICluster, "set_logger"): [("logger", ...)],
    (AICluster, "infer_async"): [("inference_name", ...), ("in_data", ...), ("param", {}), ("func", None)],
    (AICluster, "infer"): [("inference_name", ...), ("in_data", ...), ("param", {})],
    (AICluster, "put_file_async"): [("inference_name", ...), ("file_info", ...), ("func", None)],
    (AICluster, "put_file"): [("inference_name", ...), ("file_info", ...)],
    (AICluster, "get_queue_info_async"): [("inference_name", ""), ("request_no", 0), ("pid", 0), ("func", None)],
    (AICluster, "get_queue_info"): [("inference_name", ""), ("request_no", 0), ("pid", 0)],
    (AICluster, "delete_queue_async"): [("inference_name", ""), ("request_no", 0), ("pid", 0), ("force_delete", False), ("func", None)],
    (AICluster, "delete_queue"): [("inference_name", ""), ("request_no", 0), ("pid", 0), ("force_delete", False)],
    (AICluster, "reload_inference_async"): [("inference_name", ...), ("func", None)],
    (AICluster, "reload_inference"): [("inference_name", ...)],
    (AICluster, "connect_aicluster"): [],
    (CoprocessorHandler, "start_distribution_async"): [("inference_name", ""), ("func", None)],
    (CoprocessorHandler, "start_distribution"): [("inference_name", "")],
    (CoprocessorHandler, "stop_distribution_async"): [("inference_name", ""), ("func", None)],
    (CoprocessorHandler, "stop_distribution"): [("inference_name", "")],
    (CoprocessorHandler, "add_inference_async"): [("inference_name", ...), ("func", None)],
    (CoprocessorHandler, "add_inference"): [("inference_name", ...)],
    (CoprocessorHandler, "get_images_async"): [("func", None)],
    (CoprocessorHandler, "get_images"): [],
    (ContainerHandler, "start_distribution_async"): [("inference_name", ""), ("func", None)],
    (ContainerHandler, "start_distribution"): [("inference_name", "")],
    (ContainerHandler, "stop_distribution_async"): [("inference_name", ""), ("func", None)],
    (ContainerHandler, "stop_distribution"): [("inference_name", "")],
    (ContainerHandler, "start_async"): [("func", None)],
    (ContainerHandler, "start"): [],
    (ContainerHandler, "stop_async"): [("func", None)],
    (ContainerHandler, "stop"): [],
    (Connector, "__init__"): [("context", None), ("sub_name", None), ("host_ip", None), ("pub_port", None), ("sub_port", None)],
    (Connector, "receive_request_image"): [("timeout", 0)],
    (Connector, "receive_request"): [("timeout", 0)],
    (Connector, "send_response"): [("result", ...), ("response", ...)],
}


# Beyond the reference, and only as keyword-only arguments after its own (so no call written
# to the reference changes meaning): the priority of an inference request.
KEYWORD_ONLY = {(AICluster, m): [("priority", 0)] for m in ("infer", "infer_async", "infer_image", "infer_image_async")}


@pytest.mark.parametrize("cls,method", list(SIGNATURES), ids=[f"{c.__name__}.{m}" for c, m in SIGNATURES])
def test_signature_is_the_references(cls, method):
    params = list(inspect.signature(getattr(cls, method)).parameters.values())[1:]  # without self
    got = [(p.name, ... if p.default is inspect.Parameter.empty else p.default) for p in params
           if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert got == SIGNATURES[(cls, method)]
    extra = [(p.name, p.default) for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert extra == KEYWORD_ONLY.get((cls, method), [])


def test_log_functions():
    from infinibrain import containers

    assert list(inspect.signature(containers.log_setting).parameters) == ["logger_name", "level"]
    assert inspect.signature(containers.log_setting).parameters["level"].default == 10
    for fn in ("debug", "info", "warning", "error", "critical", "exception"):
        sig = inspect.signature(getattr(containers, fn))
        assert [(p.name, p.default) for p in sig.parameters.values()] == [("msg", inspect.Parameter.empty), ("code", -1)]


DATA_CLASSES = {
    "ContainerConfig": ["name", "implementation_type", "input", "output", "send_timeout", "wait_queue_timeout", "force_update",
                        "max_send_num", "script_path", "inference_modules", "image_path", "image_filename", "image_tag",
                        "run_command", "run_option", "copy",
                        # ours, after the reference's (docs/DECISIONS.md, "Control plane")
                        "warmup", "ready_timeout", "max_batch_size", "max_queue_delay", "max_queue_size", "retries"],
    "InferenceModulesConfig": ["sub_inference_name", "script_tag", "model_tag", "script", "model",
                               # ours, after the reference's: the built-in model runner (docs/DECISIONS.md, "Models")
                               "hooks", "providers", "threads"],
    "InferenceResponse": ["pid", "tid", "request_no", "inference_name", "metadata", "metadata_sys", "sub_inference_name",
                          "time_stamp", "elapsed_time"],
    "CoprocessorImages": ["name", "ip", "images"],
    "ContainerStatus": ["name", "suffix_name", "cpu_proc", "mem_usage", "mem_proc", "net_io", "block_io", "created", "status",
                        "ports", "connect_status", "operate", "queue_num", "send_data_num", "allocated_coprocessor",
                        "host_location", "implementation_type", "input", "output", "send_timeout", "wait_queue_timeout",
                        "max_send_num", "script_path", "inference_modules", "image_path", "image_file", "image_tag",
                        "run_command", "run_option", "copy"],
    "QueueInfo": ["request_no", "inference_name", "pid", "mng_queue_in", "priority"],
    "ContainerDistributionStatus": ["name", "suffix_name", "distribution"],
}


@pytest.mark.parametrize("cls_name", list(DATA_CLASSES))
def test_data_class_attributes_in_order(cls_name):
    import dataclasses

    cls = getattr(infinibrain, cls_name)
    assert [f.name for f in dataclasses.fields(cls)] == DATA_CLASSES[cls_name]
    assert cls is getattr(types, cls_name)


def test_handler_attributes():
    h = ContainerHandler(None, name="n", suffix_name="n-b", allocated_coprocessor="b")
    assert list(h.to_dict()) == ["name", "suffix_name", "image_path", "image_file", "image_tag", "run_command", "run_option",
                                 "allocated_coprocessor", "max_send_num", "host_location", "implementation_type", "input",
                                 "output", "send_timeout", "wait_queue_timeout", "script_path", "inference_modules", "copy"]
    assert CoprocessorHandler(None, "b", "1.2.3.4").to_dict() == {"name": "b", "ip": "1.2.3.4"}
    config = infinibrain.ContainerConfig(name="x")
    assert (config.implementation_type, config.force_update, config.max_send_num) == ("docker", False, None)


CODES = {
    "InvalidArgumentException": 100, "SocketConnectionException": 110, "ConnectionFailedException": 111,
    "InferenceUnsubscribeException": 114, "InferenceNameNotFoundException": 300, "InvalidOperationException": 303,
    "CoprocessorNotFoundException": 304, "SendQueueFullException": 305, "SendQueueTimeoutException": 306,
    "ContainerNotFoundException": 307, "PermissionException": 308, "APIConflictException": 309,
    "ContainerReceiveTimeoutException": 401, "ContainerDisconnectException": 402, "InvalidInferenceNameException": 403,
    "SSHConnectionException": 500, "NotImplementedException": 900, "UnknownException": 999,
}


def test_every_exception_is_exported_with_its_code_and_one_base():
    for cls_name, code in CODES.items():
        cls = getattr(infinibrain, cls_name)
        assert issubclass(cls, infinibrain.InfinibrainException) and cls.code == code
        assert cls_name in infinibrain.__all__
    reference_codes = {100, 101, 110, 111, 112, 113, 114, 200, 201, 203, 205, 206, 207, 300, 301, 302, 303, 304, 305, 306,
                       307, 308, 309, 400, 401, 402, 403, 500, 900}
    assert reference_codes <= set(errors.ERROR_TABLE)
    for code in reference_codes:
        exc = errors.make_error(code, "X", "Y")
        assert exc.code == code and isinstance(exc, infinibrain.InfinibrainException)
        assert exc.message == errors.format_message(code, "X", "Y")


def test_messages_are_the_references_verbatim():
    assert errors.make_error(100, "image_data").message == "argument image_data is required"
    assert errors.make_error(101, "modle").message == "invalid key : modle"
    assert errors.make_error(203, "1.0", "2.0").message == "Tag version has changed from 1.0 into 2.0"
    assert errors.make_error(300).message == "Specified InferenceName dose not exist"
    assert errors.make_error(309, "a, b").message == "a, b is used by other process. Please retry a little later."
    assert errors.make_error(403, "cam").message == "cam does not accept data."
    e = errors.make_error(302, detail="max_send_num must be positive")
    # The message is the reference's text, verbatim; what was wrong is the detail, shown by str().
    assert e.message == "Specified Param Error" and e.detail == "max_send_num must be positive"
    assert str(e) == "[302] Specified Param Error: max_send_num must be positive" and e.text == str(e)[6:]
    import pickle

    again = pickle.loads(pickle.dumps(e))
    assert type(again) is type(e) and (again.code, again.message, again.detail) == (302, e.message, e.detail)


def test_the_references_own_exception_names_import_and_catch():
    from infinibrain import (APIConflict, ConnectionFailed, ContainerNotFoundExpection, CoprocesorNotFoundExpection,
                             InferenceUnsubscribe, InvalidArgument, NotImplemented, SendQueueFull, SocketConnection,
                             SSHConnectionExpection, UnknownExpection)

    pairs = [(InvalidArgument, 100), (SocketConnection, 110), (ConnectionFailed, 111), (InferenceUnsubscribe, 114),
             (APIConflict, 309), (SendQueueFull, 305), (NotImplemented, 900), (CoprocesorNotFoundExpection, 304),
             (ContainerNotFoundExpection, 307), (SSHConnectionExpection, 500), (UnknownExpection, 999)]
    for cls, code in pairs:
        with pytest.raises(cls):
            raise errors.make_error(code, "x")
    assert infinibrain.InvalidArgument is infinibrain.InvalidArgumentException
    # A star import gives every exception name but never shadows the builtin NotImplemented.
    scope: dict = {}
    exec("from infinibrain import *", scope)
    assert "NotImplemented" not in scope and "InvalidArgument" in scope and "SendQueueFullException" in scope
    assert "make_error" not in scope and "ERROR_TABLE" not in scope and "HINTS" not in scope
    from infinibrain import AICluster

    assert AICluster.connect_aiclustor is AICluster.connect_aicluster


EXPORTED = {
    "__version__", "AICluster", "RetryPolicy", "wait_for_manager", "CoprocessorHandler", "ContainerHandler",
    "ContainerConfig", "ContainerDistributionStatus", "ContainerStatus", "CoprocessorImages", "InferenceModulesConfig",
    "InferenceResponse", "QueueInfo",
}


def test_exported_members():
    """``infinibrain`` is the one place that exports everything (as httpx pins its own)."""
    exceptions = {name for name in infinibrain.__all__ if name not in EXPORTED}
    assert EXPORTED <= set(infinibrain.__all__)
    assert all(isinstance(getattr(infinibrain, n), type) and issubclass(getattr(infinibrain, n), infinibrain.InfinibrainException)
               for n in exceptions)
    assert {"InfinibrainException", "InvalidArgumentException", "InvalidArgument", "RequestDeletedException"} <= exceptions
    assert len(infinibrain.__all__) == len(set(infinibrain.__all__))
    for name in infinibrain.__all__:
        assert hasattr(infinibrain, name), name
    import importlib

    assert importlib.import_module("infinibrain.inference").__all__ == ["AICluster"]
    assert importlib.import_module("infinibrain.containers").__all__ == ["Connector", "container_log_util", "log_setting", "debug", "info", "warning",
                                              "error", "critical", "exception"]
