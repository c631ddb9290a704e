"""Test suite of robprune_fast (a package, so tests share helpers through tests.helpers)."""
