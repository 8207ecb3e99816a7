"""Run receipts, goodput/badput accounting, progress display and the loss plot."""
