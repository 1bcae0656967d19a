"""Fixtures of the fsck tests: one populated volume per session, copied per test."""

from __future__ import annotations

import json

import pytest

from tests.fsck.fsckutil import copy_image, populate


@pytest.fixture(scope="session")
def populated_master(tmp_path_factory):
    """(image, manifest) of a populated volume, made once."""
    d = tmp_path_factory.mktemp("fsck-master")
    img = str(d / "master.img")
    man = populate(img)
    with open(str(d / "manifest.json"), "w") as f:
        json.dump(man, f)
    return img, man


@pytest.fixture
def vol(populated_master, tmp_path):
    """A private copy of the populated volume: (image path, manifest)."""
    src, man = populated_master
    img = str(tmp_path / "vol.img")
    copy_image(src, img)
    return img, json.loads(json.dumps(man))
