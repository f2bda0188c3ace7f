// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
// Real: extends CharSequence, GetChars, Spannable, Appendable; the shell only calls toString().
package android.text;

public interface Editable extends CharSequence {
}
