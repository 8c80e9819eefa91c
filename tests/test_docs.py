"""The pages a user reads lead somewhere: every relative link and #anchor of README.md, CHANGELOG.md and docs/
resolves, and every pointer to a page or a section of one in the code, configs and tools names one that exists.
Reads text only; builds nothing."""
import re
import subprocess
from pathlib import Path

import pytest

from commands import ROOT

PAGES = sorted(p for p in {ROOT / 'README.md', ROOT / 'CHANGELOG.md', *(ROOT / 'docs').glob('*.md'),
                            *(ROOT / 'tests' / 'data').glob('**/README.md')} if p.is_file())
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
FENCE = re.compile(r'^(```|~~~)')


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code, where brackets are not links."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r'`[^`]*`', '', line))
    return '\n'.join(kept)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation stripped (hyphens and underscores
    kept), each space a hyphen."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)   # a link's text stays
    text = re.sub(r'<[^>]+>', '', text).replace('`', '').replace('*', '').lower()
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def anchors(page: Path) -> set:
    """Every anchor GitHub makes for ``page``'s headings, repeated names numbered as GitHub numbers them."""
    seen, found, fenced = {}, set(), False
    for line in page.read_text(encoding='utf-8').splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        heading = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
        if fenced or not heading:
            continue
        base = slug(heading.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f'{base}-{count}')
    return found


def links(page: Path) -> list:
    return [target for target in LINK.findall(_prose(page.read_text(encoding='utf-8')))
            if not re.match(r'^[a-z][a-z0-9+.-]*:', target)]   # http:, https:, mailto: lead outside


def test_the_anchors_follow_githubs_rules():
    assert slug('Install into an existing mmdet / mmseg environment') == 'install-into-an-existing-mmdet--mmseg-environment'
    assert slug('torch.compile') == 'torchcompile'
    assert slug('`--resume` and CPU-only training') == '--resume-and-cpu-only-training'
    assert slug('Speed in onnxruntime') == 'speed-in-onnxruntime'


def test_the_pages_exist():
    assert ROOT / 'README.md' in PAGES and ROOT / 'docs' / 'design.md' in PAGES


@pytest.mark.parametrize('page', PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition('#')
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f'{target}: no such file')
        elif anchor and resolved.suffix == '.md' and anchor not in anchors(resolved):
            broken.append(f'{target}: no heading makes #{anchor} in {resolved.relative_to(ROOT)}')
    assert not broken, broken


def _tracked_code() -> list:
    """The code, configs and tools of the checkout (git's view: ignored build output left out), or of the folder
    as it is where git is not there."""
    folders = ['dat_mm', 'tools', 'configs', 'tests', 'setup.py', 'model-index.yml']
    proc = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', *folders], cwd=ROOT, capture_output=True,
                          text=True)
    listed = proc.stdout.split() if proc.returncode == 0 else [
        p.relative_to(ROOT).as_posix() for folder in folders for p in [ROOT / folder, *(ROOT / folder).rglob('*')]]
    return [ROOT / name for name in listed
            if name.endswith(('.py', '.sh', '.yml', '.yaml', '.cfg', '.ini', '.cpp')) and (ROOT / name).is_file()
            and ROOT / name != Path(__file__).resolve()]   # this file's patterns and examples are no pointers


# A page pointer in code: docs/page.md or README.md, with an optional #anchor.
PAGE_POINTER = re.compile(r'((?:docs/[\w.-]+\.md|README\.md)(?:#[\w-]+)?)')
# A section named in words: "Section" in the README / "Section" in docs/page.md, or the README's "Section".
NAMED_SECTION = re.compile(r'"([^"\n]+)"\s+in\s+(?:the\s+)?(README|docs/[\w.-]+\.md)|README\'s\s+"([^"\n]+)"')


def test_every_pointer_in_code_names_a_page_and_section_that_exist():
    broken = []
    for source in _tracked_code():
        text = source.read_text(encoding='utf-8', errors='replace')
        where = source.relative_to(ROOT).as_posix()
        for pointer in PAGE_POINTER.findall(text):
            path, _, anchor = pointer.partition('#')
            page = ROOT / path
            if not page.is_file():
                broken.append(f'{where}: {pointer}: no such page')
            elif anchor and anchor not in anchors(page):
                broken.append(f'{where}: {pointer}: no such section')
        for quoted, page_name, readme_quoted in NAMED_SECTION.findall(text):
            page = ROOT / ('README.md' if page_name in ('README', '') else page_name)
            name = quoted or readme_quoted
            if slug(name) not in anchors(page):
                broken.append(f'{where}: "{name}" is no section of {page.relative_to(ROOT)}')
    assert not broken, broken


def test_the_pages_hold_no_development_history():
    """Commit hashes, issue numbers and notes about how the work was organised belong to git, not to users."""
    found = []
    for page in [ROOT / 'README.md', ROOT / 'CHANGELOG.md', *(ROOT / 'docs').glob('*.md')]:
        for number, line in enumerate(page.read_text(encoding='utf-8').splitlines(), 1):
            if re.search(r'[0-9a-f]{7}\b|issue #|session|shared[/]', line):
                found.append(f'{page.relative_to(ROOT)}:{number}: {line.strip()[:100]}')
    assert not found, found
