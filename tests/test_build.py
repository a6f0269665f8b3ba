from kmlip._ext.openmp import have_openmp, max_threads

import kmlip


def test_extensions_import_and_report_threads():
    assert max_threads() >= 1
    assert isinstance(have_openmp(), bool)
    assert kmlip.__version__
