"""Run reports: terminal tables, results.json, report.md and plots."""
