package transport

import (
	"testing"

	"github.com/phaul/phaul/transport/transporttest"
)

// testCA is a test CA handing out TLSFiles.
type testCA struct{ *transporttest.CA }

func newCA(t *testing.T, name string) testCA { return testCA{transporttest.NewCA(t, name)} }

// issue makes a certificate for name and returns TLS files trusting this
// CA for the peer.
func (ca testCA) issue(t *testing.T, name string) TLSFiles {
	cert, key := ca.Issue(t, name)
	return TLSFiles{CertFile: cert, KeyFile: key, CAFile: ca.File}
}
