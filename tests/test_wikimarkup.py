"""Wiki markup to prose: each construct on its own, a small dump, and the real fetched dump."""

import bz2

from npft_gguf.wikimarkup import read_articles, strip_markup


def test_templates_tables_and_refs_go():
    text = strip_markup(
        "{{Infobox person|name=X|birth={{birth date|1950|1|2}}}}\n"
        "'''Alan''' was born in 1950.<ref name=a>{{cite web|url=http://x|title=T}}</ref> He wrote.<ref name=a/>\n"
        "{| class=\"wikitable\"\n|-\n! A !! B\n|-\n| {{flag|UK}} || 2\n|}\n"
        "He lived (from 1950{{efn|a {brace} inside}}) in Leeds.<!-- a hidden\nnote -->\n")
    assert text == "Alan was born in 1950. He wrote.\nHe lived (from 1950) in Leeds."


def test_links_keep_their_text():
    text = strip_markup("The [[Greek language|Greek]] [[word]]s, see [[Plato]]'s [[:Category:Philosophy|works]].\n"
                        "[[File:Bust.jpg|thumb|A bust of [[Plato]] in [1.1.0] stone]]\n"
                        "After the [[Image:X.png|left]]war. [[Category:Greek philosophers]][[de:Platon]]\n"
                        "An [http://example.org external site] and [http://bare.example] here.")
    assert text == "The Greek words, see Plato's works.\nAfter the war.\nAn external site and here."


def test_headings_go_and_back_matter_ends_the_article():
    text = strip_markup("Intro.\n\n== History ==\nOld times.\n=== Early ===\n* A listed item\n# numbered\n"
                        "== See also ==\n* [[Other]]\n== References ==\n{{reflist}}")
    assert text == "Intro.\nOld times.\nA listed item\nnumbered"


def test_tags_entities_and_leftovers():
    text = strip_markup("H<sub>2</sub>O&nbsp;is <b>water</b>&ndash;wet.<br />\n<math>x^2</math>\n, \n"
                        "Zeus (; , Zeús) ruled.\n__NOTOC__\n{{unclosed template\nstill prose here.")
    assert text == "H2O is water\u2013wet.\nZeus (Zeús) ruled.\nstill prose here."


def write_dump(path, pages):
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    redirect = '<redirect title="X" />'
    body = "".join(
        f"<page><title>{t}</title><ns>{n}</ns><id>{i}</id>{redirect if r else ''}"
        f"<revision><id>{i}</id><text xml:space=\"preserve\">{x}</text></revision></page>"
        for i, (t, n, r, x) in enumerate(pages))
    path.write_bytes(bz2.compress(f'<mediawiki xmlns="{ns}">{body}</mediawiki>'.encode()))


def test_dump_keeps_articles_only(tmp_path):
    prose = "Prose sentence number one goes here. " * 20
    dump = tmp_path / "d.xml.bz2"
    write_dump(dump, [("Alpha", 0, False, "'''Alpha''' &lt;ref&gt;r&lt;/ref&gt;" + prose),
                      ("Beta", 0, True, "#REDIRECT [[Alpha]]" + prose),
                      ("Talk:Alpha", 1, False, prose),
                      ("Stub", 0, False, "Too short."),
                      ("Gamma (disambiguation)", 0, False, prose),
                      ("Delta", 0, False, prose)])
    arts = read_articles(dump)
    assert [a.title for a in arts] == ["Alpha", "Delta"]
    assert arts[0].text == "Alpha " + prose.strip()


def test_real_dump_is_clean_prose():
    from npft_gguf.fetch import fetch

    arts = read_articles(fetch("enwiki-dump"))
    assert 90 <= len(arts) <= 110
    text = "\n".join(a.text for a in arts)
    assert 2_000_000 < len(text) < 3_500_000
    for leftover in ("{{", "}}", "[[", "]]", "<ref", "</ref", "&nbsp;", "'''", "{|", "==", "<!--", "Category:", "thumb|"):
        assert text.count(leftover) <= 2, leftover
    assert "Anarchism is a political philosophy that advocates self-governed societies" in arts[0].text
