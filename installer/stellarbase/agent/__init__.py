"""The host agent (`stellarbase run agent`): one per host.

Every interval it collects the state of the units of stellarbase.target, of every
service's /healthz and /readyz, of the dependencies, the host, the GPUs, the migrations
and the backups, each collector under its own deadline; /readyz and /metrics answer from
that cache. It restarts a service whose /healthz keeps failing, through a root helper
(see `supervise`), and runs the WAL archiver when backups are on.

Modules: `targets` (what to watch), `collectors` (reading the host), `runner` (deadlines),
`readiness` and `metrics` (pure views of a snapshot), `supervise` (when to restart, and
asking the helper), `helper` (the root side), `runtime` (the loop and the endpoints).
"""

import ipaddress
from pathlib import Path

# Runtime paths of the running system (not under an install root: only the live host has
# them). The fault flags are test hooks: they are only ever read, and nothing creates them.
RUNTIME_DIR = Path("/run/stellarbase")
SUPERVISE_SOCKET = RUNTIME_DIR / "supervise.sock"
FAULT_DIR = RUNTIME_DIR / "fault"


def local_address(
    bind: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Where the agent's unauthenticated listener is: loopback, whatever `bind` says (an
    IPv6 `bind` gives ::1). Remote scrapers go through the token listener only."""
    return ipaddress.ip_address("::1" if bind.version == 6 else "127.0.0.1")
