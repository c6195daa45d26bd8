"""Test cases written once and run against more than one broker (each runner subclasses the cases)."""
