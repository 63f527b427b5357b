"""KServe v2 REST infer of a big body, as :predict's big bodies go (big_bodies.py): never whole on the event loop.

The body arrives in a file (fast_path.py spools it, paced), a helper process decompresses it, parses it (JSON or
the binary tensor extension), checks its tensors against the model's config and writes the encoded BatchItem
to a file the gateway maps; the item travels by reference (core/blobs.py); the worker's answer is rendered
(JSON header, binary outputs) by a helper too, into a file the route sends in slices. What the event loop keeps
is the request's small fields (id, priority, rows, the outputs asked for) and the answer's timing fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from unimodel.core import errors
from unimodel.core.context import RequestContext
from unimodel.core.replies import Encoded
from unimodel.gateway import spool
from unimodel.gateway.big_bodies import Failure, Payload, answer_in_helper
from unimodel.gateway.kserve import codec
from unimodel.gateway.ports import KServePorts
from unimodel.gateway.spool import SpooledBody
from unimodel.gateway.statistics import ReplyTimes
from unimodel.v1 import inference_pb2, model_pb2


@dataclasses.dataclass(frozen=True, slots=True)
class Rendered:
    payload: Payload
    header_length: int | None  # None: a plain JSON body; else the JSON header's length (binary outputs follow)
    worker: str
    path: str  # the instances the request passed, this gateway first


# in the helper processes ---------------------------------------------------------------------------------


def encode_rest_infer_file(
    src: str, encoding: str, limit: int, header_length: int | None, config: bytes, dst: str
) -> codec.InferCall | Failure:
    """The infer body in file `src`, decompressed, parsed, checked against the model's `config` (encoded; b"":
    not known here, the router decides) and written as the encoded BatchItem to the new file `dst`; the call
    comes back lean (its item holds only id, priority and rows)."""
    try:
        body = codec.decode_body(spool.read_file(src), encoding, limit)
        call = codec.parse_rest_infer(body, header_length)
        del body
        item = call.item
        if config:
            item.rows = codec.check_inputs(model_pb2.ModelConfig.FromString(config), item)
        spool.write_file(dst, item.SerializeToString())
        return dataclasses.replace(call, item=inference_pb2.BatchItem(id=item.id, priority=item.priority, rows=item.rows))
    except errors.UnimodelError as err:
        return Failure.of(err)


def render_rest_infer_to(
    raw: spool.Buffer, call: codec.InferCall, model: str, version: str, gateway_id: str, dst: str
) -> tuple[int | None, str, str, ReplyTimes] | Failure:
    """The worker's encoded InferResponse rendered as the REST answer into the new file `dst`: (header length,
    worker id, path with `gateway_id` first, the batch's times)."""
    try:
        reply = inference_pb2.InferResponse.FromString(raw)
        payload, header_length = codec.render_rest_infer(reply, call, model, version)
    except errors.UnimodelError as err:
        return Failure.of(err)
    except Exception as exc:  # a malformed answer: INTERNAL, as on the event loop's path
        return Failure("INTERNAL", f"could not decode the answer ({type(exc).__name__})", {})
    spool.write_file(dst, payload)
    times = ReplyTimes(reply.queue_ns, reply.compute_ns, reply.batch_rows)
    return header_length, reply.worker_id, ",".join([gateway_id, *reply.path]), times


# on the event loop ---------------------------------------------------------------------------------------


async def infer(
    gw: KServePorts, model: str, version: str, config: model_pb2.ModelConfig | None, body: SpooledBody,
    header: Callable[[str], str], header_length: int | None, check_call: Callable[[codec.InferCall], float],
    context: Callable[[float], RequestContext],
) -> tuple[Rendered, RequestContext]:
    """One infer whose body is in a file (closed here once read) for `model` (`version`: the one its answer
    names): `check_call(call)` checks the parsed call's small fields (priority) and returns its timeout;
    `context(timeout_s)` makes the request's context."""
    helpers = gw.body_codec
    try:
        item, call = await helpers.run_to_file(
            encode_rest_infer_file, body.path, header("content-encoding"), gw.settings.max_body_bytes, header_length,
            config.SerializeToString() if config is not None else b"", what="item", need=2 * len(body),
        )
    finally:
        body.close()
    ctx = context(check_call(call))

    async def render(answer: Encoded | inference_pb2.BlobRef) -> tuple[Rendered, ReplyTimes]:
        payload, (header_length, worker, path, times) = await answer_in_helper(
            gw, answer, render_rest_infer_to, call, model, version, gw.id
        )
        return Rendered(payload, header_length, worker, path), times

    rendered = await gw.infer_encoded(model, item, call.item.rows, ctx, render, "kserve_http")
    return rendered, ctx
