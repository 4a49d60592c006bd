// Package actionscript runs an operator's scripts at named points of a
// migration, like CRIU's --action-script: phaul migrate runs them on the
// source, phaul serve on the target, so that a service address can follow
// the process or a load balancer can be told.
//
// A script is run once per point with the point's name in PHAUL_ACTION
// (and in CRTOOLS_SCRIPT_ACTION, CRIU's name for it) and the details of the
// migration in other PHAUL_* variables. It must exit 0 within the timeout:
// before the commit a failure aborts the migration, which rolls back;
// after it a failure is reported, since the process runs on the target
// already. Its output goes to phaul's log.
package actionscript
