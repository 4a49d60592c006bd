package ptrace

// Requeue queues the stolen signals of every thread again (by injection,
// with their siginfo) while the threads stay stopped, and forgets them, so
// that a later Resume, Kill or death of the tracer has none to put back.
//
// Precondition: called on the Tracer thread.
func (f *Frozen) Requeue(gadget uint64) error {
	for tid, sigs := range f.Stolen {
		if len(sigs) > 0 {
			if err := requeue(f.Pid, tid, gadget, sigs); err != nil {
				return err
			}
		}
		delete(f.Stolen, tid)
	}
	return nil
}
