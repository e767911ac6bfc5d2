"""pyproject.toml installs every package of the tree, under names that cannot clash.

The package list is explicit because two folders keep the names users asked for (`cli/`,
`model_repository/`) and install as `cmc_cli` / `cmc_model_repository`; a new subpackage
missing from the list would be absent from a wheel while the checkout still worked.
"""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed_under_a_cmc_name() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    renamed = config["package-dir"]
    folders = {}
    for name in config["packages"]:
        top, *rest = name.split(".")
        folders[name] = Path(renamed.get(top, top), *rest)
    assert all(name.startswith("cmc_") for name in folders)
    assert all((ROOT / folder).is_dir() for folder in folders.values())
    in_tree = {p.parent.relative_to(ROOT) for top in ("cmc_common", "cmc_train", "cmc_export",
                                                      "cmc_serve", "cli", "model_repository")
               for p in (ROOT / top).rglob("__init__.py")}
    # Every package folder is listed; the listed folders without __init__.py are the Triton
    # python models' folders, shipped for their model.py (package-data).
    assert in_tree <= set(folders.values())
    data_only = set(folders.values()) - in_tree
    assert data_only == {Path("model_repository", m) for m in ("cmc", "cmc_patch")}


def test_installed_names_import_from_the_kept_folders() -> None:
    import cmc_cli.main
    import cmc_model_repository

    assert Path(cmc_cli.main.__file__).resolve() == ROOT / "cli" / "main.py"
    assert Path(cmc_model_repository.__file__).resolve().parent == ROOT / "model_repository"
