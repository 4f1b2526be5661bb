"""Where sftflow's secrets come from: the Hugging Face token is HF_TOKEN, else the Prefect Secret block `hf-token`
(`SFTFLOW_HF_TOKEN_BLOCK` names another), loaded only when a Hub call needs it and a Prefect API is there (a
run, or PREFECT_API_URL). A token is passed to the Hub client
and nowhere else: never into the config, MLflow params, Prefect parameters, artifacts or logs.

Save one for a server's workers (its value shows as ******** in the UI):

    from prefect.blocks.system import Secret
    Secret(value="hf_...").save("hf-token")
"""

from __future__ import annotations

import os

from tasks.core.common import in_prefect_run, stage_logger

HF_TOKEN_BLOCK = "hf-token"


def token_block_name() -> str:
    """Return the name of the Prefect Secret block that holds the Hugging Face token."""
    return os.environ.get("SFTFLOW_HF_TOKEN_BLOCK") or HF_TOKEN_BLOCK


def hub_token() -> str | None:
    """Return the Hugging Face token: HF_TOKEN, else the Prefect Secret block's value, else None (huggingface_hub
    then uses its own login, `hf auth login`, if there is one)."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    name = token_block_name()
    if not (in_prefect_run() or os.environ.get("PREFECT_API_URL")):
        return None  # no Prefect API to ask: loading a block would start a temporary server (seconds) for nothing
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name).get()
    except ValueError:  # no such block: nothing is configured, which is fine for public models
        return None
    except Exception as e:  # noqa: BLE001 -- an unreachable Prefect API must not stop a public download
        stage_logger().warning("Hugging Face token: could not read the Prefect Secret block %r (%s); going on "
                               "without it", name, type(e).__name__)
        return None
    return str(value) if value else None
