"""Tests for mailbridge."""
