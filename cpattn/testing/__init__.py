"""Test helpers shipped with cpattn: hypothesis strategies, error budgets, assertions, backends."""
