"""kcore.kb: triple files, verbalization, the built-in GeoNames knowledge base."""

from __future__ import annotations

import json

import pytest

from kcore import kb
from kcore.errors import FileFormatError, InvalidInputError, KcoreError


def test_verbalize_default_and_custom_template():
    t = kb.Triple("Japan", "capital", "Tokyo")
    assert kb.verbalize(t) == "Japan capital Tokyo ."
    assert kb.verbalize(t, "{object} is the {relation} of {subject}.") == "Tokyo is the capital of Japan."
    assert kb.verbalize(kb.Triple(" New  York ", "state", "New York")) == "New York state New York ."
    with pytest.raises(InvalidInputError, match="template"):
        kb.verbalize(t, "{subject} {predicate}")


@pytest.mark.parametrize("bad", ["", "  ", "a\nb", "a\tb"])
def test_triple_rejects_bad_fields(bad):
    with pytest.raises(InvalidInputError, match="object"):
        kb.Triple("s", "r", bad)


def test_tsv_round_trip_header_comments_and_dedup(tmp_path):
    path = tmp_path / "kb.tsv"
    triples = [kb.Triple("Japan", "capital", "Tokyo"), kb.Triple("France", "capital", "Paris")]
    kb.write_triples(path, triples + triples[:1])
    assert path.read_text().splitlines()[0] == "subject\trelation\tobject"
    assert kb.read_triples(path) == triples + triples[:1]
    assert kb.load_facts(path) == ["Japan capital Tokyo .", "France capital Paris ."]
    path.write_text("# comment\n\nSpain\tcapital\tMadrid\n")
    assert kb.read_triples(path) == [kb.Triple("Spain", "capital", "Madrid")]


def test_jsonl_objects_lists_and_numbers(tmp_path):
    path = tmp_path / "kb.jsonl"
    path.write_text(
        json.dumps({"subject": "Japan", "relation": "population", "object": 126529100}) + "\n"
        + json.dumps(["France", "capital", "Paris"]) + "\n"
    )
    assert kb.load_facts(path) == ["Japan population 126529100 .", "France capital Paris ."]


def test_txt_facts(tmp_path):
    path = tmp_path / "facts.txt"
    path.write_text("Japan capital Tokyo .\n\n  France   capital Paris .\nJapan capital Tokyo .\n")
    assert kb.load_facts(path) == ["Japan capital Tokyo .", "France capital Paris ."]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("a.tsv", "Japan\tcapital\n", r"a.tsv:1: expected 3 fields"),
        ("b.tsv", "x\ty\tz\nJapan\t\tTokyo\n", r"b.tsv:2: .*relation"),
        ("c.jsonl", "{not json}\n", r"c.jsonl:1: invalid JSON"),
        ("d.jsonl", '{"subject": "a", "object": "b"}\n', r"d.jsonl:1: .*relation"),
        ("e.tsv", "# only a comment\n", r"no facts"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(FileFormatError, match=match):
        kb.load_facts(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(KcoreError, match="not found"):
        kb.load_facts(tmp_path / "nope.tsv")
    (tmp_path / "x.csv").write_text("a,b,c\n")
    with pytest.raises(InvalidInputError, match="format"):
        kb.read_triples(tmp_path / "x.csv")


def test_builtin_kb_countries_and_cities():
    triples = kb.default_triples()
    facts = set(kb.default_facts())
    # hand-checked GeoNames / ISO entries
    for fact in [
        "Japan capital Tokyo .",
        "Japan currency Yen .",
        "Japan continent Asia .",
        "Japan language Japanese .",
        "France borders Spain .",
        "Switzerland currency Swiss Franc .",
        "Belgium language Dutch .",
        "Osaka country Japan .",
        "Chicago state Illinois .",
        "Tokyo timezone Asia/Tokyo .",
    ]:
        assert fact in facts, fact
    capitals = [t for t in triples if t.relation == "capital"]
    assert 240 <= len(capitals) <= 252
    assert len({t.subject for t in capitals}) == len(capitals), "one capital per country"
    assert len(facts) > 100_000
    assert all(f.endswith(" .") and "\n" not in f for f in facts)
    pops = [t for t in triples if t.subject == "Japan" and t.relation == "population"]
    assert len(pops) == 1 and int(pops[0].object) > 100_000_000


def test_builtin_kb_filters():
    only_countries = kb.default_triples(cities=False)
    assert {t.relation for t in only_countries} == set(kb.COUNTRY_RELATIONS.values())
    big = kb.default_triples(countries=False, min_city_population=5_000_000)
    assert 10 < len({t.subject for t in big}) < 100
    assert all(int(t.object) >= 5_000_000 for t in big if t.relation == "population")


@pytest.mark.slow
def test_builtin_large_kb():
    import airportsdata

    frankfurt = airportsdata.load("ICAO")["EDDF"]["name"]
    expected = {
        "Zermatt country Switzerland .",           # GeoNames cities500 (6,629 inhabitants)
        "Zermatt timezone Europe/Zurich .",
        "Zermatt alternative name Cermatt .",
        "Munich alternative name Minga .",
        "Ad-Damazin state Blue Nile .",            # countrystatecity-countries
        "Blue Nile country Sudan .",
        f"{frankfurt} ICAO code EDDF .",            # airportsdata
        f"{frankfurt} IATA code FRA .",
        "Japan capital Tokyo .",                   # the countries of the small KB
    }
    seen, n, relations = set(), 0, set()
    for fact in kb.large_facts():
        n += 1
        if fact in expected:
            seen.add(fact)
        relations.add(fact)  # distinct facts
    assert seen == expected
    assert 1_900_000 < n < 2_200_000 and 1_800_000 < len(relations) < 2_000_000
    assert kb.builtin_facts("builtin") == kb.default_facts()
    with pytest.raises(InvalidInputError, match="unknown built-in knowledge base"):
        kb.builtin_facts("builtin-huge")
