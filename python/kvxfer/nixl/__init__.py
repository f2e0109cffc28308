"""NIXL's Python API over kvxfer: ``from kvxfer.nixl import nixl_agent,
nixl_agent_config`` in place of NIXL's import. See ``kvxfer.nixl._api``."""

from ._api import (
    DEFAULT_COMM_PORT,
    nixl_agent,
    nixl_agent_config,
    nixl_backend_handle,
    nixl_prepped_dlist_handle,
    nixl_thread_sync_t,
    nixl_xfer_handle,
    nixlRegDList,
    nixlXferDList,
    nixlXferTelemetry,
)

__all__ = [
    "DEFAULT_COMM_PORT",
    "nixl_agent",
    "nixl_agent_config",
    "nixl_backend_handle",
    "nixl_prepped_dlist_handle",
    "nixl_thread_sync_t",
    "nixl_xfer_handle",
    "nixlRegDList",
    "nixlXferDList",
    "nixlXferTelemetry",
]
