"""Learning from failures: capture every failed request as a redacted record, take feedback from
the application, report on a time range, export labelled examples and calibrate the confidence
gate's thresholds from reviewers' decisions."""
