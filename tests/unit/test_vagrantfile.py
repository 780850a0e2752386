"""The Vagrantfile defines a box for each supported distribution, and each box is provisioned
by scripts/vagrant-provision.sh, which recognises its distribution and picks its binary.

The VMs themselves need virtualization, which the development machines and CI lack, so ruby
evaluates the Vagrantfile against a small stub of Vagrant's configuration DSL that records
what it is told, and the script's decisions are checked by sourcing it into bash.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VAGRANTFILE = REPO / "Vagrantfile"
PROVISION = "scripts/vagrant-provision.sh"
PILOT = REPO / "config" / "tiers" / "pilot.yaml"

BOXES = {
    "debian12": "debian/bookworm64",
    "ubuntu2204": "bento/ubuntu-22.04",
    "ubuntu2404": "bento/ubuntu-24.04",
    "rocky9": "bento/rockylinux-9",
}

# Stands in for Vagrant: `Vagrant.configure` runs the block against recording objects and
# prints what was defined as JSON.
VAGRANT_STUB = r"""
require "json"

class Settings
  attr_reader :values

  def initialize
    @values = {}
  end

  def method_missing(name, *args)
    return super unless name.to_s.end_with?("=") && args.size == 1
    @values[name.to_s.chomp("=")] = args.first
  end

  def respond_to_missing?(name, include_private = false)
    name.to_s.end_with?("=") || super
  end
end

class VMConfig
  attr_accessor :box, :hostname
  attr_reader :machines

  def initialize
    @machines = {}
    @providers = {}
    @provisioners = []
    @synced_folders = []
  end

  def define(name, **_options)
    node = Config.new
    yield node
    @machines[name.to_s] = node.vm.to_h
  end

  def provider(name)
    settings = Settings.new
    yield settings if block_given?
    @providers[name.to_s] = settings.values
  end

  def provision(type, **options)
    @provisioners << { "type" => type.to_s }.merge(options.transform_keys(&:to_s))
  end

  def synced_folder(source, target, **options)
    @synced_folders << { "source" => source, "target" => target }
      .merge(options.transform_keys(&:to_s))
  end

  def to_h
    { "box" => box, "hostname" => hostname, "providers" => @providers,
      "provisioners" => @provisioners, "synced_folders" => @synced_folders,
      "machines" => @machines }
  end
end

class Config
  attr_reader :vm

  def initialize
    @vm = VMConfig.new
  end
end

module Vagrant
  def self.configure(version)
    config = Config.new
    yield config
    puts JSON.generate({ "version" => version }.merge(config.vm.to_h))
  end
end

load ARGV.fetch(0)
"""


@pytest.fixture(scope="module")
def ruby() -> str:
    found = shutil.which("ruby")
    if found is None:
        pytest.fail("ruby is missing: run scripts/setup.sh, which installs Debian's ruby package")
    return found


@pytest.fixture(scope="module")
def vagrant(ruby: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the Vagrantfile defines, with SB_BUILD and an unrelated variable set."""
    stub = tmp_path_factory.mktemp("vagrant") / "vagrant_stub.rb"
    stub.write_text(VAGRANT_STUB)
    env = {
        "PATH": os.environ["PATH"],
        "LANG": "C.UTF-8",
        "SB_BUILD": "vm",
        "UNRELATED_TOKEN": "not for the VM",
    }
    out = subprocess.run(
        [ruby, str(stub), str(VAGRANTFILE)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    defined: dict[str, Any] = json.loads(out.stdout)
    return defined


def test_ruby_accepts_the_vagrantfile(ruby: str) -> None:
    out = subprocess.run([ruby, "-c", str(VAGRANTFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Syntax OK" in out.stdout


def test_one_box_per_supported_distribution(vagrant: dict[str, Any]) -> None:
    assert vagrant["version"] == "2"
    boxes = {name: machine["box"] for name, machine in vagrant["machines"].items()}
    assert boxes == BOXES
    for name, machine in vagrant["machines"].items():
        assert machine["hostname"] == f"stellarbase-{name}"


def test_every_box_is_provisioned_by_the_script(vagrant: dict[str, Any]) -> None:
    for name, machine in vagrant["machines"].items():
        [provisioner] = machine["provisioners"]
        assert provisioner["type"] == "shell", name
        assert provisioner["path"] == PROVISION, name
        assert "inline" not in provisioner, name
    assert (REPO / PROVISION).is_file()


def test_only_the_provisioning_settings_of_the_host_reach_the_vm(
    vagrant: dict[str, Any],
) -> None:
    for machine in vagrant["machines"].values():
        assert machine["provisioners"][0]["env"] == {"SB_BUILD": "vm"}


def test_every_box_is_big_enough_for_the_pilot_tier(vagrant: dict[str, Any]) -> None:
    needs = yaml.safe_load(PILOT.read_text())["requirements"]
    for name, machine in vagrant["machines"].items():
        assert set(machine["providers"]) == {"virtualbox", "libvirt"}, name
        for provider, settings in machine["providers"].items():
            assert settings["cpus"] >= needs["min_cpus"], (name, provider)
            assert settings["memory"] >= needs["min_memory_gib"] * 1024, (name, provider)


def test_the_vm_gets_a_copy_of_the_tree_without_the_host_venv(vagrant: dict[str, Any]) -> None:
    [folder] = vagrant["synced_folders"]
    assert (folder["source"], folder["target"], folder["type"]) == (".", "/vagrant", "rsync")
    assert {".venv/", "build/"} <= set(folder["rsync__exclude"])
    assert "dist/" not in folder["rsync__exclude"]  # shared release bundles live there


# --- scripts/vagrant-provision.sh -------------------------------------------------------------


def test_the_provisioning_script_parses() -> None:
    out = subprocess.run(["bash", "-n", str(REPO / PROVISION)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("os_release", "distro"),
    [
        ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n', "debian12"),
        ('NAME="Ubuntu"\nVERSION_ID="22.04"\nID=ubuntu\nID_LIKE=debian\n', "ubuntu2204"),
        ('NAME="Ubuntu"\nVERSION_ID="24.04"\nID=ubuntu\nID_LIKE=debian\n', "ubuntu2404"),
        ('ID="rocky"\nID_LIKE="rhel centos fedora"\nVERSION_ID="9.5"\n', "el9"),
    ],
)
def test_the_script_recognises_the_distribution(
    tmp_path: Path, os_release: str, distro: str
) -> None:
    out = detect(tmp_path, os_release)
    assert (out.returncode, out.stdout.strip()) == (0, distro)


@pytest.mark.parametrize(
    "os_release",
    ['ID=debian\nVERSION_ID="11"\n', 'ID=ubuntu\nVERSION_ID="20.04"\n', 'ID="centos"\n'],
)
def test_the_script_refuses_other_distributions(tmp_path: Path, os_release: str) -> None:
    out = detect(tmp_path, os_release)
    assert out.returncode == 1
    assert "unsupported distribution" in out.stderr


def detect(tmp_path: Path, os_release: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "os-release"
    path.write_text(os_release)
    return subprocess.run(
        ["bash", str(REPO / PROVISION), "--detect"],
        env={"PATH": os.environ["PATH"], "OS_RELEASE": str(path)},
        capture_output=True,
        text=True,
    )


BUNDLE = f"stellarbase-0.1.0-linux-{platform.machine()}.tar.gz"


@pytest.mark.parametrize(
    ("glibc", "bundles", "mode", "expected"),
    [
        ("2.36", [BUNDLE], None, f"shared {BUNDLE}"),  # Debian 12
        ("2.39", [BUNDLE], None, f"shared {BUNDLE}"),  # Ubuntu 24.04
        ("2.35", [BUNDLE], None, "build"),  # Ubuntu 22.04
        ("2.34", [BUNDLE], None, "build"),  # Rocky 9
        ("2.39", [], None, "build"),
        ("2.39", ["stellarbase-0.1.0-linux-otherarch.tar.gz"], None, "build"),
        ("2.39", [BUNDLE], "vm", "build"),
        ("2.34", [BUNDLE], "bundle", f"shared {BUNDLE}"),
        (
            "2.36",
            [BUNDLE, BUNDLE.replace("0.1.0", "0.10.0"), BUNDLE.replace("0.1.0", "0.9.0")],
            None,
            f"shared {BUNDLE.replace('0.1.0', '0.10.0')}",
        ),
    ],
)
def test_the_script_uses_a_shared_bundle_only_where_its_glibc_runs_it(
    tmp_path: Path, glibc: str, bundles: list[str], mode: str | None, expected: str
) -> None:
    out = choose(tmp_path, glibc, bundles, mode)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_the_script_insists_on_a_shared_bundle_when_asked_to(tmp_path: Path) -> None:
    out = choose(tmp_path, "2.36", [], "bundle")
    assert out.returncode == 1
    assert "no bundle" in out.stderr


def choose(
    tmp_path: Path, glibc: str, bundles: list[str], mode: str | None
) -> subprocess.CompletedProcess[str]:
    """Source the script with a fake glibc version and say which bundle it would install."""
    dist = tmp_path / "dist"
    dist.mkdir()
    for name in bundles:
        (dist / name).touch()
    script = f"""
        source {REPO / PROVISION}
        glibc_version() {{ echo {glibc}; }}
        shared=$(shared_bundle)
        if use_shared_bundle "$shared"; then echo "shared ${{shared##*/}}"; else echo build; fi
    """
    env = {"PATH": os.environ["PATH"], "STELLARBASE_SRC": str(tmp_path)}
    if mode is not None:
        env["SB_BUILD"] = mode
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
