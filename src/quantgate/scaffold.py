"""`quantgate init`: scaffold the files a team owns in its own repository.

The regression suite is not scaffolded: it is installed with quantgate (quantgate.suite), so an upgrade of
quantgate reaches it. What a team owns and edits is written once, from templates shipped in the package
(quantgate/templates, the same files as this repository's fixtures/, thresholds/ and ci/workflows/):

    fixtures/demo.yaml            the matrix (models, variants, tasks), from the demo, with its comments
    thresholds/retention.yaml     retention floors per format (and the regression baseline folder)
    thresholds/policy.yaml        gate tiers and what INCONCLUSIVE does per cadence
    thresholds/distribution.yaml  distribution-metric limits per format
    thresholds/perf.yaml          serving performance budgets (`-m perf`)
    .github/workflows/*.yml       the pull-request gate, nightly and promote workflows
    pytest.ini                    points pytest at the installed suite and at these files
    .gitignore                    results and caches

An existing file is never overwritten (it is reported as kept), unless ``force``.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

from quantgate.atomic import atomic_write_text
from quantgate.errors import QuantgateError

# template (relative to quantgate/templates) -> destination (relative to the project)
FILES: dict[str, str] = {
    "fixtures/demo.yaml": "fixtures/demo.yaml",
    "thresholds/retention.yaml": "thresholds/retention.yaml",
    "thresholds/policy.yaml": "thresholds/policy.yaml",
    "thresholds/distribution.yaml": "thresholds/distribution.yaml",
    "thresholds/perf.yaml": "thresholds/perf.yaml",
    # GitHub runs workflows only from .github/workflows (this repository keeps its copies in ci/workflows)
    "workflows/pr-gate.yml": ".github/workflows/quantgate-pr-gate.yml",
    "workflows/nightly.yml": ".github/workflows/quantgate-nightly.yml",
    "workflows/promote.yml": ".github/workflows/quantgate-promote.yml",
    "pytest.ini": "pytest.ini",
    "gitignore": ".gitignore",
}

MATRIX_HEADER = (
    "# Scaffolded by `quantgate init` from quantgate's demo matrix. This file is yours: replace the model, "
    "variants\n# and tasks with your own (README, \"Point it at your model\"); `quantgate check` validates it.\n"
)

# In this repository the workflows install the checkout (".[gpu]"); in a team's repository, the package. quantgate
# is not on PyPI, so the default is the README's git URL with a placeholder the team must set (or a wheel's URL):
# pip fails on it, naming the URL, rather than installing whatever else a package index holds under that name.
INSTALL_PLACEHOLDER = "quantgate[gpu] @ git+https://github.com/<org>/quantgate"
WORKFLOW_INSTALL = {
    'description: "what pip installs (this repository: .[gpu]; a team\'s own repository: quantgate[gpu])"':
        'description: "what pip installs: quantgate[gpu] from a git URL or a wheel (quantgate is not on PyPI)"',
    'default: ".[gpu]"':
        f'default: "{INSTALL_PLACEHOLDER}"  # set <org>, or a wheel: README, "Adopt it in your repository"',
    "'.[gpu]'": f"'{INSTALL_PLACEHOLDER}'",
}


@dataclass
class InitReport:
    """What `init` did: files written and files kept because they existed (paths relative to the project)."""

    root: Path
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [*(f"wrote {p}" for p in self.written),
                *(f"kept  {p} (exists; --force overwrites)" for p in self.kept)]


def template_text(name: str) -> str:
    """The text of a shipped template (`name` a key of FILES); QuantgateError if the install lacks it."""
    resource = importlib.resources.files("quantgate") / "templates" / name
    try:
        return resource.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise QuantgateError(f"quantgate's template {name} is missing from this install ({exc}): reinstall "
                             "quantgate") from None


def render(template: str) -> str:
    """A template's text as written into a team's project."""
    text = template_text(template)
    if template == "fixtures/demo.yaml":
        return MATRIX_HEADER + text
    if template.startswith("workflows/"):
        for here, there in WORKFLOW_INSTALL.items():
            text = text.replace(here, there)
        if ".[gpu]" in text:  # a workflow edited so that a replacement above no longer matches
            raise QuantgateError(f"quantgate's template {template} still installs '.[gpu]' after scaffolding: "
                                 "update quantgate.scaffold.WORKFLOW_INSTALL")
    return text


def init_project(root: Path, force: bool = False) -> InitReport:
    """Write the team-owned files into `root` (created if absent); existing files are kept unless `force`.

    Raises QuantgateError when `root` exists and is not a directory."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise QuantgateError(f"{root} exists and is not a directory")
    report = InitReport(root.resolve())
    rendered = {dest: render(src) for src, dest in FILES.items()}  # every template read before any write
    for dest, text in rendered.items():
        path = root / dest
        if path.exists() and not force:
            report.kept.append(dest)
            continue
        atomic_write_text(path, text)
        report.written.append(dest)
    return report
