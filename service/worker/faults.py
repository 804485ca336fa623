"""Fault injection for the fault tests, on only with LDM_TEST_FAULTS=1 (never in production): magic
prompts that make a worker die, or its loop hang, when it admits them."""

from __future__ import annotations

import logging
import os
import time

from ..ldm.batch import Member

log = logging.getLogger(__name__)

CRASH_PROMPT = "__crash_worker__"  # the worker dies when it admits this job
# The loop hangs for 4 x stall_timeout_s when it admits this job on its first delivery (as a hung
# device call would), then goes on.
STALL_PROMPT = "__stall_worker__"
# This job's latent loses a channel when it joins the batch: every UNet call that holds it raises
# (as a request that breaks the model would), alone too.
POISON_PROMPT = "__poison_step__"


def poison(prompt: str, member: Member) -> None:
    if prompt == POISON_PROMPT:
        log.error("fault injection: job %s breaks every step it is in", member.key)
        member.x = member.x[:, :-1]


def inject(prompt: str, job_id: str, deliveries: int, stall_timeout_s: float) -> None:
    if prompt == CRASH_PROMPT:
        log.error("fault injection: crashing on job %s", job_id)
        os._exit(1)
    if prompt == STALL_PROMPT and deliveries == 1:
        log.error("fault injection: the loop hangs on job %s", job_id)
        time.sleep(4 * stall_timeout_s)
