"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a lab.

What the page shows is compared with what the API answers; the live migration panel must be
fed by the event stream (its log entries say where each step came from), and a viewer's page
holds no button for an action a viewer may not take. Screenshots go to bench-results/."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from labkit import VMFERRY, LabRun, default_topology, running_lab

pytestmark = [pytest.mark.root, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"          # Debian's package: Playwright downloads no browser
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "bench-results"
VM = "dash1"
VM_IP = "192.0.2.10"
PHASES = ["precheck", "extend_vlan", "preset_port", "start_destination", "precopy",
          "switchover", "announce", "clean_source", "prune_vlan", "verify"]
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    with running_lab(tmp_path_factory.mktemp("state"), default_topology("dash")) as run:
        yield run


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "chromium is missing: run scripts/install-system-deps.sh"
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


def admin_token(lab: LabRun) -> str:
    return (lab.state_dir / "labs" / lab.name / "secrets" / "admin.token").read_text().strip()


def api(lab: LabRun, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    response = httpx.request(method, f"http://127.0.0.1:{lab.port}{path}", json=body,
                             headers={"Authorization": f"Bearer {token or admin_token(lab)}"},
                             timeout=60)
    assert response.is_success, response.text
    return response.json() if response.content else None


def open_dashboard(browser: Browser, lab: LabRun, token: str) -> tuple[Page, list[str]]:
    """A page in its own context (its own localStorage), logged in through the URL fragment,
    and the list its script errors go to."""
    page = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"http://127.0.0.1:{lab.port}/#token={token}")
    page.wait_for_selector("#stream[data-state=live]", timeout=WAIT_MS)
    assert "token=" not in page.url, "the token must leave the address bar"
    return page, errors


def action_buttons(page: Page) -> dict[str, str]:
    return {b.get_attribute("data-action"): b.get_attribute("data-needs")
            for b in page.locator("button").all()}


def test_dashboard_follows_the_site_and_a_live_migration(lab: LabRun, browser: Browser) -> None:
    SHOTS.mkdir(exist_ok=True)
    lab.cli("vm", "create", VM, "--host", "host1", "--vlan", "100", "--ip", f"{VM_IP}/24",
            "--memory", "256", "--workload-mibps", "2")
    try:
        assert lab.wait_ping("client-100", VM_IP)
        page, page_errors = open_dashboard(browser, lab, admin_token(lab))
        expect(page.locator("#role")).to_have_attribute("data-role", "admin")

        # ---- the overview matches the API: racks, hosts, VMs, trunks and their VLANs
        expect(page.locator(f'#vms tr[data-vm="{VM}"]')).to_have_attribute("data-host", "host1")
        for host in api(lab, "GET", "/v1/hosts"):
            card = page.locator(f'[data-rack="{host["rack"]}"] [data-host="{host["name"]}"]')
            expect(card).to_contain_text("agent alive")
        expect(page.locator(f'[data-host="host1"] [data-vm="{VM}"]')).to_contain_text("VLAN 100")
        expect(page.locator(f'#vms tr[data-vm="{VM}"] td').nth(3)).to_have_text("100")
        trunks = api(lab, "GET", "/v1/fabric")
        assert any(t["desired"] == [100] for t in trunks)
        for t in trunks:
            expect(page.locator(f'#fabric tr[data-trunk="{t["a"]}-{t["b"]}"]')).to_have_attribute(
                "data-desired", ",".join(map(str, t["desired"])) or "-")
        expect(page.locator("#audit-status")).to_have_attribute("data-findings", "0")
        buttons = action_buttons(page)
        assert {"migrate", "reconcile", "audit"} <= set(buttons), buttons
        page.screenshot(path=str(SHOTS / "dashboard-overview.png"), full_page=True)

        # ---- a live migration, started from the CLI, followed on the page
        migrate = subprocess.Popen([*VMFERRY, "migrate", VM, "--to", "host3", "--bandwidth",
                                    "40", "--json"], env=lab.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            page.wait_for_function(
                "() => { const live = document.getElementById('live');"
                " return live.dataset.state === 'running' && live.dataset.phase === 'precopy'"
                " && Number(live.dataset.progress) > 0; }", timeout=WAIT_MS)
            expect(page.locator('#live [data-phase="precopy"].current')).to_be_visible()
            page.screenshot(path=str(SHOTS / "dashboard-migration.png"), full_page=True)
            out, err = migrate.communicate(timeout=300)
        finally:
            if migrate.poll() is None:
                migrate.kill()
                migrate.wait()
        assert migrate.returncode == 0, out + err
        record = json.loads(out)
        assert record["state"] == "completed"
        expect(page.locator("#live")).to_have_attribute("data-state", "completed",
                                                        timeout=WAIT_MS)
        expect(page.locator("#live")).to_have_attribute("data-progress", "100")
        steps = [li.get_attribute("data-phase") for li in
                 page.locator('#live-log li[data-source="stream"]').all()]
        assert "precopy" in steps and steps[-1] == "completed", steps
        seen = [s for s in steps if s in PHASES]
        assert seen == sorted(seen, key=PHASES.index), f"phases out of order: {steps}"
        # The end of the migration brings the VM's new place (and rack) to the page.
        expect(page.locator(f'#vms tr[data-vm="{VM}"]')).to_have_attribute("data-host", "host3",
                                                                           timeout=WAIT_MS)
        expect(page.locator(f'[data-rack="rack2"] [data-vm="{VM}"]')).to_be_visible()
        expect(page.locator(f'#migrations tr[data-migration="{record["id"]}"]')
               ).to_have_attribute("data-state", "completed")

        # ---- audit findings: a stray tap on host2, seen by a viewer, removed by the admin
        tap = lab.exec("host2", "ip", "tuntap", "add", "dev", "vm-ghost", "mode", "tap")
        assert tap.returncode == 0, tap.stderr
        viewer = api(lab, "POST", "/v1/tokens", {"name": "dash-viewer", "role": "viewer"})
        seen_by_viewer, viewer_errors = open_dashboard(browser, lab, viewer["token"])
        expect(seen_by_viewer.locator("#role")).to_have_attribute("data-role", "viewer")
        expect(seen_by_viewer.locator(f'#vms tr[data-vm="{VM}"]')).to_have_attribute(
            "data-host", "host3")
        seen_by_viewer.locator('button[data-action="audit"]').click()
        expect(seen_by_viewer.locator('#audit tr[data-kind="tap"]')).to_contain_text("vm-ghost")
        buttons = action_buttons(seen_by_viewer)
        assert buttons == {"audit": "read"}, f"a viewer sees buttons it cannot use: {buttons}"
        assert viewer_errors == []

        page.locator('button[data-action="audit"]').click()
        expect(page.locator('#audit tr[data-kind="tap"]')).to_contain_text("vm-ghost")
        page.locator('button[data-action="fix"]').click()
        expect(page.locator("#audit-status")).to_have_attribute("data-findings", "0",
                                                                timeout=WAIT_MS)
        assert "vm-ghost" not in lab.exec("host2", "ip", "-o", "link").stdout
        expect(page.locator("#events")).to_contain_text("audit.fix")
        assert page_errors == []
    finally:
        lab.exec("host2", "ip", "link", "del", "vm-ghost")
        lab.cli("vm", "delete", VM, check=False)
