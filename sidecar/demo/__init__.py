"""The fault-injecting demo model (`sidecar demo-model`): a stand-in model server for examples and
tests, with per-request and global faults. See `sidecar.demo.server` and `sidecar.demo.faults`."""

from sidecar.demo.faults import FaultSchedule, FaultSpec, FaultSpecError, parse_spec

__all__ = ["FaultSchedule", "FaultSpec", "FaultSpecError", "parse_spec"]
