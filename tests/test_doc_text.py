"""scripts/doc_text.py: reStructuredText and POD to the prose a reader sees, code left out."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("doc_text", Path(__file__).parents[1] / "scripts" / "doc_text.py")
doc_text = importlib.util.module_from_spec(spec)
spec.loader.exec_module(doc_text)

RST = """\
Title of the page
=================

.. module:: functools
   :synopsis: Higher-order functions.

The :mod:`functools` module is for
higher-order functions, see :func:`~functools.cache` and :pep:`412`
and `the wiki <https://example.org>`_.

.. function:: cache(user_function)

   Simple **lightweight** function cache.  For example::

        @cache
        def f(n): return n

   >>> f(1)
   1

   .. versionadded:: 3.9 Some words.

.. code-block:: c

   int x = 1;

=====  =====
a      b
=====  =====

* an item
  continued
* another
"""

POD = """\
=head1 NAME

perlreftut - a I<short> tutorial, see L<perlref|perlref> and C<< $x->[0] >> E<gt> 1.

    my %h = (a => 1);

=over 4

=item *

A list item X<index entry>.

=back
"""


def test_rst_to_text():
    assert doc_text.rst_to_text(RST).split("\n\n") == [
        "Title of the page",
        "The functools module is for higher-order functions, see cache and PEP 412 and the wiki.",
        "Simple lightweight function cache. For example:",
        "Some words.",
        "* an item continued\n* another",
    ]


def test_pod_to_text():
    assert doc_text.pod_to_text(POD).split("\n\n") == [
        "NAME",
        "perlreftut - a short tutorial, see perlref and $x->[0] > 1.",
        "A list item.",
    ]
