package configs

import (
	"encoding"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"
)

// EnvPrefix starts every environment override: SHOAL_PROTOCOL_PING_INTERVAL=5s
// sets protocol.ping_interval. Lists take comma-separated values
// (SHOAL_CLUSTER_JOIN=10.0.0.2:7946,10.0.0.3:7946). Only single values and
// lists of strings can be set this way; other SHOAL_ variables (such as the
// default key variables SHOAL_AUTH_KEY and SHOAL_API_KEY) are not overrides
// and are left alone.
const EnvPrefix = "SHOAL_"

// envKeys maps every overridable env name to its dotted config key.
func envKeys() map[string]string {
	out := map[string]string{}
	var walk func(t reflect.Type, path string)
	walk = func(t reflect.Type, path string) {
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if name == "" || name == "-" {
				continue
			}
			key := join(path, name)
			ft := f.Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			switch {
			case reflect.PointerTo(ft).Implements(textUnmarshaler):
				out[envName(key)] = key
			case ft.Kind() == reflect.Struct:
				walk(ft, key)
			case ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.String:
				out[envName(key)] = key
			case ft.Kind() == reflect.String, ft.Kind() == reflect.Int, ft.Kind() == reflect.Bool:
				out[envName(key)] = key
			}
		}
	}
	walk(reflect.TypeOf(Config{}), "")
	return out
}

func envName(key string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// EnvOverrides lists the env names that can override config keys, sorted.
func EnvOverrides() []string {
	keys := envKeys()
	out := make([]string, 0, len(keys))
	for k := range keys {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// applyEnv sets config fields from SHOAL_* variables found by lookup.
func applyEnv(cfg *Config, lookup func(string) (string, bool)) Errors {
	var errs Errors
	keys := envKeys()
	names := make([]string, 0, len(keys))
	for n := range keys {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		val, ok := lookup(name)
		if !ok {
			continue
		}
		key := keys[name]
		if err := setPath(reflect.ValueOf(cfg).Elem(), strings.Split(key, "."), val); err != nil {
			errs = append(errs, &Error{File: "env " + name, Key: key, Msg: err.Error()})
		}
	}
	return errs
}

func setPath(v reflect.Value, path []string, val string) error {
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ",")
		if name != path[0] {
			continue
		}
		f := v.Field(i)
		if len(path) > 1 {
			return setPath(f, path[1:], val)
		}
		return setValue(f, val)
	}
	return fmt.Errorf("no such key")
}

func setValue(f reflect.Value, val string) error {
	if f.Kind() == reflect.Pointer {
		p := reflect.New(f.Type().Elem())
		if err := setValue(p.Elem(), val); err != nil {
			return err
		}
		f.Set(p)
		return nil
	}
	if u, ok := f.Addr().Interface().(encoding.TextUnmarshaler); ok {
		return u.UnmarshalText([]byte(val))
	}
	switch f.Kind() {
	case reflect.String:
		f.SetString(val)
	case reflect.Int:
		n, err := strconv.Atoi(strings.TrimSpace(val))
		if err != nil {
			return fmt.Errorf("expected a whole number, got %q", val)
		}
		f.SetInt(int64(n))
	case reflect.Bool:
		b, err := strconv.ParseBool(strings.TrimSpace(val))
		if err != nil {
			return fmt.Errorf("expected true or false, got %q", val)
		}
		f.SetBool(b)
	case reflect.Slice:
		var items []string
		for _, s := range strings.Split(val, ",") {
			if s = strings.TrimSpace(s); s != "" {
				items = append(items, s)
			}
		}
		f.Set(reflect.ValueOf(items))
	default:
		return fmt.Errorf("cannot be set from the environment")
	}
	return nil
}

// lookupEnv is os.LookupEnv; tests replace it.
var lookupEnv = os.LookupEnv
