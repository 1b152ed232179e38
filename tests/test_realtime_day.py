"""The undisturbed real-time day has no process test of its own any more: its outcome does not depend
on the processes, so it is judged where it is exact.

- tests/test_virtual_day.py: a four-hour day on the virtual clock (every service in one process over
  the in-memory broker): zero sustained violations, every interval settled by every site and equal to
  the meter's integral (the coordinator's and one made from the broker's readings), envelopes
  published an interval ahead, no failed round, each reading enforced against the envelope the
  coordinator published for its interval, an AC power flow of the measured injections within limits;
  the same day twice gives the same results and the same messages; an independent observer fed from
  the broker alone counts the same violations as the coordinator (none, and on a day with one).
- tests/test_lockstep_day.py: the same day as processes over a real Mosquitto on the lockstep clock
  equals the virtual day to the last digit, and a plain MQTT client's count equals the coordinator's.
- tests/test_realtime_recovery.py and tests/test_realtime_coordinator_loss.py: real processes over
  Mosquitto, SIGKILLed and started again.

This file used to run a four-hour day as processes on an accelerated wall clock, with bounds a
loaded machine could break.
"""
