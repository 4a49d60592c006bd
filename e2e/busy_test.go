package e2e

import (
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/testutil"
)

// TestDumpWaitsForPendingConnection dumps a server while a connection
// waits in its listener's accept queue (a state no image can carry: its
// client end is elsewhere). The server accepts every 400 ms: the dump must
// let it run, freeze it again once the queue is empty, and succeed. A
// server that never accepts is refused after the last attempt, by name,
// and keeps running untraced.
func TestDumpWaitsForPendingConnection(t *testing.T) {
	for _, tc := range []struct {
		name  string
		every string
	}{
		{"accepts-later", "400"},
		{"never-accepts", "0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			needPhaul(t)
			w := startFixtureOpts(t, "slowaccept", &testutil.Options{}, "--every", tc.every)
			var port string
			for _, l := range w.Lines() {
				if p, ok := strings.CutPrefix(l, "PORT "); ok {
					port = p
				}
			}
			if port == "" {
				t.Fatalf("no PORT line: %v", w.Lines())
			}
			if tc.every != "0" {
				// Right after an accept: the next is 400 ms away.
				w.WaitLine(t, len(w.Lines()), "ACCEPTED", 5*time.Second)
			}
			c, err := net.Dial("tcp4", "127.0.0.1:"+port)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			start := time.Now()
			r := runPhaul(t, w, "dump", "-t", strconv.Itoa(w.Pid), "-D", imageDir(t), "--leave-running", "-v")
			took := time.Since(start)
			if tc.every == "0" {
				r.mustFail(t, w, "accept queue", "after 10 attempts")
				assertResumed(t, w, 0)
				return
			}
			r.mustSucceed(t, w)
			if !strings.Contains(r.stderr, "frozen again") {
				t.Errorf("the dump did not wait for the pending connection (took %v):\n%s", took, r.stderr)
			}
			t.Logf("dumped after the server accepted, in %v", took.Round(time.Millisecond))
		})
	}
}
