"""Lease names fit the lease table's column whatever the folder's name (up to 1,000 chars)."""

from __future__ import annotations

from bridge.leases import NAME_MAX, lease_name


def test_a_short_name_is_kept() -> None:
    assert lease_name("folder:home/INBOX") == "folder:home/INBOX"


def test_a_long_name_fits_and_is_the_same_on_every_instance() -> None:
    long_folder = "Archive/" + "Ä" * 990
    name = lease_name(f"folder:home/{long_folder}")
    assert len(name) <= NAME_MAX
    assert name.startswith("folder:#")
    assert name == lease_name(f"folder:home/{long_folder}")  # another instance: same lease
    assert name != lease_name(f"folder:home/{long_folder}x")  # another folder: another lease
    assert name != lease_name(f"folder:work/{long_folder}")
