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
    folders = {name: Path(*name.split(".")) for name in config["packages"]}
    for name, folder in config["package-dir"].items():
        folders[name] = Path(folder)
    assert all(name.startswith("cmc_") for name in folders)
    in_tree = {p.parent.relative_to(ROOT) for top in ("cmc_common", "cmc_train", "cmc_export",
                                                      "cmc_serve", "cli", "model_repository")
               for p in (ROOT / top).rglob("__init__.py")}
    assert in_tree == set(folders.values())


def test_installed_names_import_from_the_kept_folders() -> None:
    import cmc_cli.main
    import cmc_model_repository

    assert Path(cmc_cli.main.__file__).resolve() == ROOT / "cli" / "main.py"
    assert Path(cmc_model_repository.__file__).resolve().parent == ROOT / "model_repository"
