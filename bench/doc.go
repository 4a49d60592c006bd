// Package bench measures migrations the way users judge them: the pause
// the application itself saw (its largest gap between heartbeats), the
// stall a connected client saw, phaul's own frozen time, total time, bytes
// on the wire and rounds. It runs workloads (package bench/workload, or a
// user's command), repeats and interleaves the configurations under
// comparison, and writes the raw figures as JSON, a Markdown report with
// medians and spreads, and SVG plots.
package bench
