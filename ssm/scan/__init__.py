"""The selective-scan core: one public function, several backends.

    from ssm.scan import selective_scan, selective_state_update
    from ssm.scan import ssd, ssd_state_update  # Mamba-2's scan (ssm.scan.ssd)
"""

from ssm.scan.core import IMPLS, default_impl, selective_scan, selective_state_update
from ssm.scan.ssd import ssd, ssd_state_update

__all__ = ["IMPLS", "default_impl", "selective_scan", "selective_state_update", "ssd",
           "ssd_state_update"]
from ssm.scan.mamba3 import Mamba3State, mamba3_scan, mamba3_state_update  # noqa: E402
