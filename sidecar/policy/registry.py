"""Hot reload: notice that the policy file changed and load the new one.

A Kubernetes ConfigMap mounted as a directory changes by swapping the `..data` symlink, so the
file's own mtime may not move: the fingerprint is the content hash of the resolved file. The app
polls `PolicyWatcher.poll()`; a valid new policy is swapped in atomically by the caller (requests
in flight keep the runtime they started with); an invalid one raises `PolicyError` and the old
policy keeps serving.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sidecar.policy.loader import LoadedPolicy, Overrides, load_policy

__all__ = ["PolicyWatcher"]


class PolicyWatcher:
    def __init__(self, path: Path, overrides: Overrides) -> None:
        self.path = path
        self.overrides = overrides
        self._fingerprint = self._read_fingerprint()

    def _read_fingerprint(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def poll(self) -> LoadedPolicy | None:
        """The new policy when the file's content changed, None when it did not. Raises
        `PolicyError` for a changed but invalid file (reported once per distinct content)."""
        fingerprint = self._read_fingerprint()
        if fingerprint is None or fingerprint == self._fingerprint:
            return None
        self._fingerprint = fingerprint
        return load_policy(self.path, self.overrides)

    def force(self) -> LoadedPolicy:
        """Load now (SIGHUP), whether or not the content changed."""
        self._fingerprint = self._read_fingerprint()
        return load_policy(self.path, self.overrides)
