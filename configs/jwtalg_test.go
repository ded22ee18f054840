package configs

import (
	"strings"
	"testing"
)

// PS256/384/512 are verified by package auth and the jwt rule, so the config
// check must accept them too (it once kept a shorter list of its own).
func TestJWTAlgorithmsChecked(t *testing.T) {
	for _, tc := range []struct {
		alg string
		ok  bool
	}{{"HS256", true}, {"PS256", true}, {"PS512", true}, {"EdDSA", true}, {"none", false}, {"XX1", false}} {
		_, err := Load([]byte("auth:\n  jwt:\n    algorithms: ["+tc.alg+"]\n"), "t.yaml")
		if tc.ok && err != nil {
			t.Errorf("%s refused: %v", tc.alg, err)
		}
		if !tc.ok && (err == nil || !strings.Contains(err.Error(), "t.yaml:3: auth.jwt.algorithms[0]: unsupported algorithm")) {
			t.Errorf("%s: want a key+line error, got %v", tc.alg, err)
		}
	}
}
