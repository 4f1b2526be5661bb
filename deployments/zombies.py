"""Prefect's zombie-run automation on a Prefect server: a flow run that stops sending heartbeats (its worker or
machine was lost mid-run) is marked Crashed, so a pipeline that placed a step there retries it (flows/placement.py).

    python deployments/zombies.py [--after 90]      # against $PREFECT_API_URL; `make prefect-up` does it too

Prefect 3.8 keeps such a run Running for ever by itself. The recipe is Prefect's own ("Detect zombie flows"): flow runs
send a `prefect.flow-run.heartbeat` event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (30 at least; give every
worker that variable), and a proactive automation expects, after each heartbeat, another one or a final state within
`--after` seconds. Keep that several heartbeats long: one late heartbeat (a busy machine, a slow network) is no crash.
"""

from __future__ import annotations

import argparse
import sys

ZOMBIE_AFTER_S = 90  # a flow run silent this long is marked Crashed (3 heartbeats: one late one is no crash)
ZOMBIE_AUTOMATION = "sftflow: crash flow runs that stopped sending heartbeats"


def ensure_zombie_automation(within_s: float = ZOMBIE_AFTER_S) -> None:
    """Create (or update) Prefect's zombie-run automation: a flow run whose heartbeats stop for `within_s` seconds
    without a final state is marked Crashed (a worker or machine lost mid-run), so the parent retries it."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in
                                                ("Completed", "Failed", "Cancelled", "Crashed", "Paused"))},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
        within=timedelta(seconds=within_s))
    action = ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {within_s:g} s: its worker or "
                                                                 "machine was lost (zombie flow run)")
    try:
        automation = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:  # none by that name yet
        Automation(name=ZOMBIE_AUTOMATION, trigger=trigger, actions=[action]).create()
        print(f"automation {ZOMBIE_AUTOMATION!r} created (Crashed after {within_s:g} s without a heartbeat)")
        return
    automation.trigger, automation.actions = trigger, [action]
    automation.update()
    print(f"automation {ZOMBIE_AUTOMATION!r} kept (Crashed after {within_s:g} s without a heartbeat)")


def main(argv: list[str] | None = None) -> int:
    """Command line: create or update the automation on the server PREFECT_API_URL names."""
    parser = argparse.ArgumentParser(prog="deployments/zombies.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--after", type=float, default=ZOMBIE_AFTER_S,
                        help=f"seconds without a heartbeat before a flow run is marked Crashed (default "
                             f"{ZOMBIE_AFTER_S})")
    ensure_zombie_automation(parser.parse_args(argv).after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
