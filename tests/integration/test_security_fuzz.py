"""Issue 15, fuzzing: generated requests against one real cluster (nats-server, etcd, router, batcher, cache,
embedding-worker, a gpu-worker running the test repository's demo models, the gateway with an admin key).

* HTTP: schemathesis generates requests for every operation of the gateway's own OpenAPI document
  (GET /openapi.json); most of them name a demo model, so inference routes reach the engines.
* gRPC: random messages built from the request descriptors of unimodel.v1.InferenceService and KServe's
  inference.GRPCInferenceService, fresh or mutated from a valid request: edge and random integers of
  each field's width, invalid enum numbers, long strings, repeated fields up to a few thousand entries,
  google.protobuf.Value nested past every limit.

Both pass when no answer is a server error (HTTP >= 500; gRPC INTERNAL or UNKNOWN) and no service logged a
traceback. Each prints the number of cases run. The case counts are bounded (UNIMODEL_FUZZ_EXAMPLES per
HTTP operation, default 12; UNIMODEL_FUZZ_GRPC_CASES, default 300) and the generation is derandomized, so a
run is repeatable; set UNIMODEL_FUZZ_SEED to explore other cases.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import descriptor, message_factory, struct_pb2
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2

from helpers.support import Infra, Services
from unimodel.local.procs import free_port, http_ok, wait_until
from unimodel.v1 import generate_pb2, inference_pb2, services_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ADMIN_KEY = "sk-root"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
LLM, EMBEDDER = "smollm2-135m-instruct", "all-minilm-l6-v2"
MODELS = ["identity", "mlp", "iris-classifier", LLM, EMBEDDER]
SEED = int(os.environ.get("UNIMODEL_FUZZ_SEED", "0"))
HTTP_EXAMPLES = int(os.environ.get("UNIMODEL_FUZZ_EXAMPLES", "12"))
GRPC_CASES = int(os.environ.get("UNIMODEL_FUZZ_GRPC_CASES", "300"))
MAX_GENERATED_TOKENS = 4  # generations that reach the engine stay short: the fuzzer tests inputs, not the LLM


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Services]:
    """Every service, the demo models, auth on (an admin key): as `unimodel up` with keys."""
    infra = Infra(tmp_path_factory.mktemp("fuzz"))
    services = Services(infra)
    try:
        infra.start()
        for kind in ("router", "batcher", "embedding-worker"):
            services.start(kind)
        services.start("cache", "--data-dir", str(infra.tmp / "cache"))
        services.start("gpu-worker", "--instance-id", "worker-0", name="worker-0")
        services.http_port, services.grpc_port = free_port(), free_port()
        gateway = services.start(
            "gateway", "--http-port", str(services.http_port), "--grpc-port", str(services.grpc_port),
            "--model-repository", str(model_repository), "--load-models", ",".join(MODELS),
            "--admin-api-keys", f'{{"{ADMIN_KEY}": "ops"}}',
        )
        wait_until(lambda: http_ok(f"{services.url}/health/ready"), 60, "gateway ready", gateway)
        wait_until(lambda: all(_ready(services, m) for m in MODELS), 120, "demo models ready")
        yield services
    finally:
        services.stop()
        infra.stop()


def _ready(services: Services, model: str) -> bool:
    r = httpx.get(f"{services.url}/v2/models/{model}/ready", headers=AUTH, timeout=5)
    return r.status_code == 200


def _tracebacks(infra: Infra) -> list[str]:
    lines = infra.sink.getvalue().splitlines()
    return ["\n".join(lines[max(0, i - 3) : i + 12]) for i, line in enumerate(lines) if "Traceback" in line]


# HTTP: schemathesis over the OpenAPI document --------------------------------------------------------------
def _aim(case: Any, model: str | None) -> None:
    """Point a generated case at a demo model (path parameter, body `model`), and keep generations short."""
    if model is None:
        return
    if case.method != "DELETE":  # deleting a demo model would leave the rest of the run nothing to reach
        for key in ("name", "model"):
            if isinstance(case.path_parameters, dict) and key in case.path_parameters:
                case.path_parameters[key] = model
    body = case.body
    if isinstance(body, dict) and case.path == "/modelcache" and isinstance(body.get("scope"), dict):
        body["scope"]["model"] = model  # ModelCache's scope: a chat model's cache
    if isinstance(body, dict) and case.path.startswith(("/v1/chat", "/v1/completions", "/v1/embeddings")):
        body["model"] = model
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if value is None or (type(value) is int and MAX_GENERATED_TOKENS < value <= 1 << 20):
                body[key] = MAX_GENERATED_TOKENS
        if type(body.get("min_tokens")) is int and body["min_tokens"] > MAX_GENERATED_TOKENS:
            body["min_tokens"] = MAX_GENERATED_TOKENS


def test_http_api_fuzzed_by_schemathesis_has_no_server_error(cluster: Services) -> None:
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(f"{cluster.url}/openapi.json", headers=AUTH)
    failures: list[str] = []
    by_status: dict[int, int] = {}

    def fuzz(operation: Any) -> None:
        # positive cases follow the schema, negative ones break it (wrong types, out-of-range numbers...)
        strategy = st.one_of(
            operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
            operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
        )

        @given(case=strategy, model=st.sampled_from([*MODELS, None]))
        @settings(
            max_examples=HTTP_EXAMPLES, deadline=None, derandomize=SEED == 0, database=None,
            suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
        )
        def one(case: Any, model: str | None) -> None:
            _aim(case, model)
            response = case.call(base_url=cluster.url, headers=AUTH, timeout=30)
            by_status[response.status_code] = by_status.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                curl = case.as_curl_command(headers=AUTH)[:800]
                failures.append(f"{operation.label} -> {response.status_code} {response.text[:300]}\n  {curl}")

        (hypothesis.seed(SEED)(one) if SEED else one)()

    for result in schema.get_all_operations():
        fuzz(result.ok())
    cases = sum(by_status.values())
    operations = len(list(schema.get_all_operations()))
    print(f"\nschemathesis: {cases} HTTP cases over {operations} operations, answers by status {dict(sorted(by_status.items()))}")
    assert cases >= HTTP_EXAMPLES
    assert not failures, "\n".join(failures)
    assert not _tracebacks(cluster.infra), "\n\n".join(_tracebacks(cluster.infra))


# gRPC: random messages from the descriptors ---------------------------------------------------------------
_INT_EDGES = {
    descriptor.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    descriptor.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    descriptor.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    descriptor.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    descriptor.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    descriptor.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    descriptor.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_STRINGS = ["", "INPUT0", "OUTPUT0", "FP32", "BYTES", "INT64", "priority", "timeout", "binary_data_output", "user",
            "../../etc/passwd", "\x00", "é" * 3, "x" * 5000]


class MessageFuzzer:
    """Random values for a message's fields, by descriptor: fresh messages, or valid ones mutated."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, field: descriptor.FieldDescriptor) -> int:
        lo, hi = _INT_EDGES[field.type]
        return self.rng.choice([0, 1, -1 if lo else 0, 2, 4, 64, lo, hi, hi - 1, 2**31 - 1 if hi > 2**31 else hi, self.rng.randint(lo, hi)])

    def scalar(self, field: descriptor.FieldDescriptor) -> Any:
        t = field.type
        if t in _INT_EDGES:
            return self.integer(field)
        if t == descriptor.FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t in (descriptor.FieldDescriptor.TYPE_FLOAT, descriptor.FieldDescriptor.TYPE_DOUBLE):
            return self.rng.choice([0.0, -1.0, 0.5, 1.0, 2.5, 1e30, -1e30, float("inf"), float("nan"), self.rng.uniform(-5, 5)])
        if t == descriptor.FieldDescriptor.TYPE_STRING:
            return self.rng.choice([*_STRINGS, *MODELS, *MODELS, "".join(chr(self.rng.randint(32, 0x2FF)) for _ in range(self.rng.randint(1, 40)))])
        if t == descriptor.FieldDescriptor.TYPE_BYTES:
            return self.rng.choice([b"", b"\x00" * 16, self.rng.randbytes(self.rng.randint(1, 64)), b"\xff" * 4096])
        if t == descriptor.FieldDescriptor.TYPE_ENUM:
            numbers = [v.number for v in field.enum_type.values]
            return self.rng.choice([*numbers, 999, -5])  # proto3 enums are open: unknown numbers travel
        raise AssertionError(f"unhandled field type {t}")

    def value(self, depth: int) -> struct_pb2.Value:
        """A google.protobuf.Value; sometimes nested far past the gateway's limit."""
        v = struct_pb2.Value()
        roll = self.rng.random()
        if depth <= 0 or roll < 0.3:
            self.rng.choice([lambda: setattr(v, "number_value", self.rng.choice([0, 1.5, 1e300, 2**64])),
                             lambda: setattr(v, "string_value", self.rng.choice(_STRINGS)),
                             lambda: setattr(v, "bool_value", True),
                             lambda: setattr(v, "null_value", 0)])()
        elif roll < 0.65:
            v.list_value.SetInParent()
            for _ in range(self.rng.choice([0, 1, 1, 2, 4])):
                v.list_value.values.append(self.value(depth - 1))
        else:
            v.struct_value.SetInParent()
            for _ in range(self.rng.choice([0, 1, 1, 2])):
                v.struct_value.fields[self.rng.choice(_STRINGS[:8])].CopyFrom(self.value(depth - 1))
        return v

    def deep_value(self, levels: int) -> struct_pb2.Value:
        root = struct_pb2.Value()
        node = root
        for _ in range(levels):
            node = node.list_value.values.add() if self.rng.random() < 0.5 else node.struct_value.fields["a"]
        node.number_value = 1
        return root

    def fill(self, msg: Message, depth: int = 4) -> None:
        """Set a random subset of `msg`'s fields."""
        if msg.DESCRIPTOR.full_name == "google.protobuf.Value":
            msg.CopyFrom(self.deep_value(self.rng.randint(30, 49)) if self.rng.random() < 0.2 else self.value(6))
            return
        for field in msg.DESCRIPTOR.fields:
            if self.rng.random() < 0.5:
                self.set_field(msg, field, depth)

    def set_field(self, msg: Message, field: descriptor.FieldDescriptor, depth: int) -> None:
        is_message = field.type == descriptor.FieldDescriptor.TYPE_MESSAGE
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(msg, field.name)
            key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for _ in range(self.rng.choice([1, 2, 3])):
                key = self.scalar(key_f)
                if value_f.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
                    if depth > 0:
                        self.fill(target[key], depth - 1)
                else:
                    target[key] = self.scalar(value_f)
            return
        if field.is_repeated:
            target = getattr(msg, field.name)
            count = self.rng.choice([0, 1, 2, 3, 8, 2000 if not is_message else 50])
            for _ in range(count):
                if is_message:
                    if depth > 0:
                        self.fill(target.add(), depth - 1)
                else:
                    target.append(self.scalar(field))
            return
        if is_message:
            if depth > 0:
                self.fill(getattr(msg, field.name), depth - 1)
            return
        setattr(msg, field.name, self.scalar(field))

    def mutate(self, msg: Message) -> None:
        """Change one to three fields of a valid message (here or one level down)."""
        for _ in range(self.rng.randint(1, 3)):
            target = msg
            set_messages = [f for f, _ in msg.ListFields() if f.type == descriptor.FieldDescriptor.TYPE_MESSAGE
                            and not f.is_repeated]
            if set_messages and self.rng.random() < 0.4:
                target = getattr(msg, self.rng.choice(set_messages).name)
            if target.DESCRIPTOR.full_name == "google.protobuf.Value":
                self.fill(target)
                continue
            field = self.rng.choice(target.DESCRIPTOR.fields)
            if not field.is_repeated or self.rng.random() < 0.5:
                target.ClearField(field.name)
            self.set_field(target, field, 2)


def _valid_requests() -> dict[str, list[Callable[[], Message]]]:
    """Valid requests per method: the seeds that mutations start from, so many cases reach the engines."""

    def infer(model: str, width: int) -> Message:
        r = service_pb2.ModelInferRequest(model_name=model, id="fuzz")
        r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, width]).contents.fp32_contents.extend([0.5] * width)
        return r

    def raw_infer() -> Message:
        r = service_pb2.ModelInferRequest(model_name="identity")
        r.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 2])
        r.raw_input_contents.append(b"\x00" * 16)
        r.outputs.add(name="OUTPUT0")
        return r

    def generate() -> Message:
        r = generate_pb2.GenerateRequest(model=LLM, session="fuzz")
        r.messages.add(role="user", content="Say hi")
        r.sampling.max_tokens = MAX_GENERATED_TOKENS
        return r

    predict = [
        lambda: inference_pb2.PredictRequest(model="identity", input=_json([[1.0, 2.0, 3.0, 4.0]])),
        lambda: inference_pb2.PredictRequest(model="iris-classifier", input=_json({"features": [5.1, 3.5, 1.4, 0.2]})),
        lambda: inference_pb2.PredictRequest(model=EMBEDDER, input=_json("a sentence")),
    ]
    return {
        "/unimodel.v1.InferenceService/Predict": predict,
        "/unimodel.v1.InferenceService/Generate": [generate],
        "/unimodel.v1.InferenceService/GenerateUnary": [generate],
        "/inference.GRPCInferenceService/ModelInfer": [lambda: infer("identity", 4), lambda: infer("mlp", 4), raw_infer],
        "/inference.GRPCInferenceService/ModelStreamInfer": [lambda: infer("identity", 4)],
        "/inference.GRPCInferenceService/ModelReady": [lambda: service_pb2.ModelReadyRequest(name="identity")],
        "/inference.GRPCInferenceService/ModelMetadata": [lambda: service_pb2.ModelMetadataRequest(name="mlp")],
        "/inference.GRPCInferenceService/ModelConfig": [lambda: service_pb2.ModelConfigRequest(name="mlp")],
        "/inference.GRPCInferenceService/ModelStatistics": [lambda: service_pb2.ModelStatisticsRequest(name="mlp")],
    }


def _json(value: Any) -> struct_pb2.Value:
    from unimodel.core.values import to_value

    return to_value(value)


def _shorten(request: Message) -> None:
    """A generation that reaches the engine generates a few tokens at most (invalid counts stay invalid)."""
    sampling = getattr(request, "sampling", None)
    if isinstance(sampling, generate_pb2.SamplingParams) and 0 <= sampling.max_tokens <= 1 << 20:
        sampling.max_tokens = min(max(sampling.max_tokens, 1), MAX_GENERATED_TOKENS)
        if sampling.min_tokens > MAX_GENERATED_TOKENS:
            sampling.min_tokens = MAX_GENERATED_TOKENS


def _methods() -> list[tuple[str, descriptor.MethodDescriptor]]:
    services = [services_pb2.DESCRIPTOR.services_by_name["InferenceService"],
                service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]]
    return [(f"/{s.full_name}/{m.name}", m) for s in services for m in s.methods]


def _call(channel: grpc.Channel, path: str, method: descriptor.MethodDescriptor, request: Message) -> grpc.StatusCode:
    reply_type = message_factory.GetMessageClass(method.output_type)
    metadata = (("authorization", f"Bearer {ADMIN_KEY}"),)
    kwargs = {"request_serializer": type(request).SerializeToString, "response_deserializer": reply_type.FromString}
    try:
        if method.client_streaming and method.server_streaming:
            for _ in channel.stream_stream(path, **kwargs)(iter([request, request]), metadata=metadata, timeout=30):
                pass
        elif method.server_streaming:
            for _ in channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=30):
                pass
        else:
            channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=30)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_grpc_methods_fuzzed_with_generated_messages_have_no_server_error(cluster: Services) -> None:
    rng = random.Random(SEED)
    fuzzer = MessageFuzzer(rng)
    methods = _methods()
    seeds = _valid_requests()
    by_status: dict[str, int] = {}
    failures = []
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}", options=options) as channel:
        # Triton's service declares more methods than the gateway implements (shared memory, tracing, ...):
        # one case each shows they answer UNIMPLEMENTED; the rest of the cases go to the others.
        for path, method in list(methods):
            code = _call(channel, path, method, message_factory.GetMessageClass(method.input_type)())
            by_status[code.name] = by_status.get(code.name, 0) + 1
            if code == grpc.StatusCode.UNIMPLEMENTED:
                methods.remove((path, method))
            elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                failures.append(f"{path} (empty request) -> {code.name}")
        cases = len(_methods())
        for i in range(GRPC_CASES - cases):
            path, method = methods[i % len(methods)]
            request_type = message_factory.GetMessageClass(method.input_type)
            valid = seeds.get(path)
            if valid and rng.random() < 0.6:
                request = rng.choice(valid)()
                fuzzer.mutate(request)
            else:
                request = request_type()
                fuzzer.fill(request)
            _shorten(request)
            code = _call(channel, path, method, request)
            by_status[code.name] = by_status.get(code.name, 0) + 1
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                failures.append(f"{path} -> {code.name}: {str(request)[:600]}")
    print(f"\ngRPC fuzzer: {sum(by_status.values())} cases over {len(_methods())} methods ({len(methods)} implemented), "
          f"answers by status {dict(sorted(by_status.items()))}")
    assert not failures, "\n".join(failures)
    assert not _tracebacks(cluster.infra), "\n\n".join(_tracebacks(cluster.infra))
