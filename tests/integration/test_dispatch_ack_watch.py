"""Issue 17: a worker that reconnected to NATS while it held a batch may have lost the batch's ack on the
way (its node of a NATS cluster died). The batcher, which sends batches straight to workers (issue 19), sends
such a batch again (core/dispatch.py `watch_acks`, and its own reconnect: batcher/service.py
`_after_reconnect`) instead of waiting `try_timeout_s` (30 s) with its slot held.

Here NATS restarts while a 3 s batch runs on the worker: every process reconnects, and the batcher, which
has waited over 1 s for the ack, sends the batch again. The request is answered, and well before the
try timeout would have ended the wait.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers.support import Infra, Services, delay_model, register_model
from unimodel.local.procs import wait_until

pytestmark = pytest.mark.integration

SLOW = "slow-ack"


def test_a_batch_held_by_a_worker_that_reconnected_is_sent_again(tmp_path: Path) -> None:
    infra = Infra(tmp_path)
    services = Services(infra)
    try:
        infra.start()
        services.start("router", "--instance-id", "router-0", name="router-0")
        batcher = services.start("batcher", "--try-timeout-s", "30")
        services.start("gpu-worker", "--instance-id", "worker-0", name="worker-0")
        register_model(infra, delay_model(SLOW, 3000, max_batch_size=4))
        services.start_gateway()
        services.wait_models([SLOW])

        answer: list[httpx.Response] = []
        call = threading.Thread(target=lambda: answer.append(services.predict([1.0], model=SLOW, timeout=40)))
        started = time.monotonic()
        call.start()
        time.sleep(1.0)  # the batch runs on the worker (3 s): its ack is due in about 2 s
        infra.restart_nats(down_s=0.3)
        call.join(40)
        took = time.monotonic() - started
        assert answer and answer[0].status_code == 200, answer[0].text if answer else "no answer"
        assert answer[0].json()["output"]["OUTPUT0"] == [1.0]
        again = ("sending the batch again", "waiting batch(es) again")
        wait_until(lambda: any(a in line for line in batcher.lines for a in again), 10, "the batcher sent again", batcher)
        assert took < 20, took  # not the 30 s try timeout
    finally:
        services.stop()
        infra.stop()
