// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.content;

import java.io.File;

public abstract class Context {
    public abstract File getExternalFilesDir(String type);
}
