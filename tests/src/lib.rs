//! Integration tests that boot real microVMs live in tests/tests/.
