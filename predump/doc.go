// Package predump runs the rounds of an iterative pre-dump: memory copied
// while the process keeps running, then copied again where it changed.
//
// One round (Run) asks the Tracker which pages were written since the
// previous round, finds the pages the process has now (present or swapped
// out), reads those that are new to the copy or were written with
// process_vm_readv while the process runs, and hands the result to a
// Sink, in address order:
//
//   - WritePages: data of pages read this round;
//   - ZeroPages: pages read this round that were all zero (never stored);
//   - KeepPages: pages the previous round recorded and the tracker reports
//     unchanged (PAGES_IN_PARENT in an image);
//   - pages not mentioned are gone (unmapped, dropped): a copy must not
//     keep them.
//
// A page is kept only if the previous round recorded it and the tracker
// says it was not written since; every other present page is read. That
// rule makes a round correct whatever happens between the tracker's scan
// and the read: a page written after the scan is read in its newer state
// and reported again by the next round; a page that appears after the
// scan was not recorded by the previous round, so it is read; a page that
// vanishes before the read is left out. The last round of a migration runs
// with the process frozen (engine.Dump with a parent), which makes the
// final copy exact.
//
// ImageSink writes a round into an image directory (image.PageWriter);
// the network page server implements Sink for live migration.
package predump
