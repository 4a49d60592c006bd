package testutil

import (
	"errors"
	"testing"

	"github.com/phaul/phaul/internal/feature"
)

// SkipIfNotSupported skips the test when err reports a missing kernel
// feature (errors.Is(err, feature.ErrNotSupported)), giving the reason, and
// fails it on any other non-nil error: a probe that could not run is a
// failure, not a reason to skip. Typical use:
//
//	testutil.SkipIfNotSupported(t, feature.UffdWPAsync())
func SkipIfNotSupported(t testing.TB, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if errors.Is(err, feature.ErrNotSupported) {
		t.Skip(err.Error())
		return // for a testing.TB whose Skip returns
	}
	t.Fatal(err)
}
