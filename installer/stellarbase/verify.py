"""The health gate: every unit active and every /readyz answering 200, before a deadline."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from stellarbase import systemd
from stellarbase.errors import ExitCode, StellarError


def probe(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """HTTP status and body of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


def wait_healthy(units: list[str], ready_urls: list[tuple[str, str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending_units = list(units)
    pending_urls = list(ready_urls)
    last: dict[str, str] = {}
    while True:
        statuses = systemd.show(pending_units)
        pending_units = [u for u in pending_units if not statuses[u].active]
        for unit in pending_units:
            last[unit] = f"{statuses[unit].active_state}/{statuses[unit].sub_state}"
        still: list[tuple[str, str]] = []
        with ThreadPoolExecutor(max_workers=max(1, len(pending_urls))) as pool:
            answers = list(pool.map(lambda item: probe(item[1]), pending_urls))
        for (unit, url), (code, body) in zip(pending_urls, answers, strict=True):
            if code != 200:
                still.append((unit, url))
                last[unit] = f"{url} answered {code or 'nothing'}: {body.strip()[:200]}"
        pending_urls = still
        if not pending_units and not pending_urls:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    failing = sorted({*pending_units, *(u for u, _ in pending_urls)})
    first = failing[0]
    raise StellarError(
        f"{first} is not healthy after {timeout:.0f}s: {last.get(first, 'unknown')}",
        hint=f"see `journalctl -u {first}` and `stellarbase status`; "
        "raise health.timeout_seconds if it is only slow",
        code=ExitCode.UNHEALTHY,
    ).with_details([f"--- last journal lines of {first}:", *systemd.journal_tail(first)])
